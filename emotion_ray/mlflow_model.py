"""The registered MLflow model: what runs wherever it is loaded (`mlflow models serve`,
`mlflow.pyfunc.load_model`), on a machine that may have nothing but the model's own files.

tracking.finish_run logs `EmotionPyfunc` with the package itself (code_paths), so the model
carries this code; it reads and decodes its inputs and scores them with `score`'s inference
settings (inference.inference_settings: the model's labels.json, faces included) and Predictor.
"""

from __future__ import annotations

from mlflow.pyfunc import PythonModel


class EmotionPyfunc(PythonModel):
    """The registered model: `score`'s settings, decode and Predictor behind MLflow's pyfunc interface.

    Input: a DataFrame with an `image` column (the file's bytes; base64 in JSON, as
    `mlflow models serve` receives them) and/or a `path` column (local, `s3://` or archive
    member paths, read where the model runs). Output: one row per input with score's
    columns (path, label, confidence, prob_<class>, width, height, error); an unreadable or
    undecodable input is an error row, never a failed batch. A face model (labels.json `faces`
    mode largest or all) crops faces as score does: a row per face kept, with score's face
    columns (face_index, box_x, box_y, box_w, box_h, face_score, faces_in_picture; null
    face_index on a picture's one row when no face was kept) after `path`. Probabilities and
    boxes equal `score`'s and `predict`'s, probabilities to float32's last bit (the same padded
    batches; inference.py). Score's default settings apply: there is no min_confidence here.
    """

    def load_context(self, context):
        from emotion_ray.runtime import setup_process

        setup_process()  # before TensorFlow loads in the serving process
        from emotion_ray.config import CPU_SCORE_BATCH
        from emotion_ray.inference import Predictor, bundle_from_files, inference_settings

        bundle = bundle_from_files(context.artifacts["model"], context.artifacts["labels"])
        self.settings = inference_settings(bundle)  # as score resolves them: the model's faces, views, temperature
        self.predictor = Predictor(bundle, CPU_SCORE_BATCH, self.settings)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import pyarrow as pa

        from emotion_ray import storage
        from emotion_ray.config import StorageConfig
        from emotion_ray.inference import FACE_COLUMNS

        n = len(model_input)
        paths = list(model_input["path"]) if "path" in model_input else [None] * n
        images = list(model_input["image"]) if "image" in model_input else [None] * n
        data = [bytes(b) if isinstance(b, (bytes, bytearray)) else None for b in images]
        paths = [storage.as_listed(p) if isinstance(p, str) else f"<input row {i}>" for i, p in enumerate(paths)]
        batch = pa.table({"path": pa.array(paths, pa.string()), "data": pa.array(data, pa.binary())})
        decoded = self.settings.decode(batch, StorageConfig())
        rows = self.predictor(decoded).drop_columns(["model_id", "scored_at"])
        frame = rows.to_pandas()
        # null, not NaN: JSON answers say `null`; a face column with a null (a picture without a
        # face) keeps its integers as integers rather than pandas' floats.
        nullable = [c for c in FACE_COLUMNS if c in rows.column_names and rows[c].null_count]
        for column in ("label", "error", *nullable):
            frame[column] = pd.Series(rows[column].to_pylist(), index=frame.index, dtype=object)
        return frame
