"""The registered MLflow model: what runs wherever it is loaded (`mlflow models serve`,
`mlflow.pyfunc.load_model`), on a machine that may have nothing but the model's own files.

tracking.finish_run logs `EmotionPyfunc` with the package itself (code_paths), so the model
carries this code; it reads and decodes its inputs and scores them with `score`'s Predictor.
"""

from __future__ import annotations

from mlflow.pyfunc import PythonModel


class EmotionPyfunc(PythonModel):
    """The registered model: `score`'s decode and Predictor behind MLflow's pyfunc interface.

    Input: a DataFrame with an `image` column (the file's bytes; base64 in JSON, as
    `mlflow models serve` receives them) and/or a `path` column (local, `s3://` or archive
    member paths, read where the model runs). Output: one row per input with score's
    columns (path, label, confidence, prob_<class>, width, height, error); an unreadable or
    undecodable input is an error row, never a failed batch. Probabilities equal `score`'s
    and `predict`'s to float32's last bit (the same padded batches; inference.py).
    """

    def load_context(self, context):
        from emotion_ray.runtime import setup_process

        setup_process()  # before TensorFlow loads in the serving process
        from emotion_ray.config import CPU_SCORE_BATCH
        from emotion_ray.inference import Predictor, bundle_from_files

        bundle = bundle_from_files(context.artifacts["model"], context.artifacts["labels"])
        self.predictor = Predictor(bundle, CPU_SCORE_BATCH)

    def predict(self, context, model_input, params=None):
        import pyarrow as pa

        from emotion_ray import storage
        from emotion_ray.config import DecodeLimits, StorageConfig
        from emotion_ray.sources import decode_table

        n = len(model_input)
        paths = list(model_input["path"]) if "path" in model_input else [None] * n
        images = list(model_input["image"]) if "image" in model_input else [None] * n
        data = [bytes(b) if isinstance(b, (bytes, bytearray)) else None for b in images]
        paths = [storage.as_listed(p) if isinstance(p, str) else f"<input row {i}>" for i, p in enumerate(paths)]
        batch = pa.table({"path": pa.array(paths, pa.string()), "data": pa.array(data, pa.binary())})
        decoded = decode_table(batch, self.predictor.bundle.image_size, DecodeLimits(), StorageConfig())
        frame = self.predictor(decoded).drop_columns(["model_id", "scored_at"]).to_pandas()
        for column in ("label", "error"):  # null, not NaN: JSON answers say `null`
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        return frame
