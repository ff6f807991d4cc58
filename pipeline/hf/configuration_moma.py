"""transformers config of a `moma export` directory (remote code, copied into every export).

    AutoConfig.from_pretrained("export/", trust_remote_code=True).moma   # moma's ModelConfig fields
"""

from transformers import PretrainedConfig


class MomaConfig(PretrainedConfig):
    model_type = "moma"

    def __init__(self, moma=None, **kwargs):
        self.moma = dict(moma or {})  # pipeline.model.config.ModelConfig.to_json()
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
