"""transformers model of a `moma export` directory (remote code, copied into every export): a thin
wrapper around moma's own Transformer, so the model and its routing rule live in one place
(moma's pipeline/model/). Needs moma installed: `pip install "moma[hf]"`.

    model = AutoModelForCausalLM.from_pretrained("export/", trust_remote_code=True)
    out = model(input_ids)                       # logits [b, t, vocab] under causal routing
    model.generate(input_ids, max_new_tokens=20, do_sample=False)

MoE and mixture-of-depths models route causally with their auxiliary routers (a token goes to expert
j iff its router scores it > 0.5); an expert-choice export without them is refused. Each generation
step recomputes the whole sequence (no KV cache through transformers; `moma generate` has one), one
sequence or equal-length sequences (no padding mask).
"""

import torch
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moma import MomaConfig

try:
    from moma.pipeline.generate import Generator, generation_routing
    from moma.pipeline.model.config import ModelConfig
    from moma.pipeline.model.transformer import Transformer
except ImportError as e:  # the wrapper has no model of its own
    raise ImportError(f"this model runs moma's own code: pip install 'moma[hf]' ({e})") from None


def routing_mode(cfg):
    """moma's one rule (pipeline/generate.py): 'causal' where expert choice or mixture-of-depths would
    rank a token against later ones; an export without the auxiliary routers that needs them is refused."""
    try:
        return generation_routing(cfg)
    except ValueError as e:
        raise ValueError(f"this export cannot be loaded for causal inference: {e}") from None


def _generator(path, model):
    """moma's Generator for the export's vocabulary (codes per image from its image tokenizer identity)."""
    import json
    import os

    from moma.tokenizers.vocab import Vocab

    vocab_file = os.path.join(path, "vocab.json")
    with open(vocab_file) as f:
        vocab = Vocab.from_json(json.load(f), source=vocab_file)
    codes = None
    if vocab.image is not None:
        extra = vocab.image.extra
        codes = (int(extra["resolution"]) // int(extra["downsample"])) ** 2
    return Generator(model, vocab, codes)


class MomaGrammar(LogitsProcessor):
    """moma's generation grammar for `model.generate`: image codes only inside an image, exactly one
    image's worth of them, then <|eoi|> (pipeline/generate.py's rule, not a copy of it)."""

    def __init__(self, generator):
        self.generator = generator

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            allowed = self.generator.allowed_after(input_ids[row].tolist()).to(scores.device)
            scores[row, ~allowed[: scores.shape[1]]] = float("-inf")
        return scores


class MomaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MomaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.moma_config = ModelConfig.from_json(config.moma)
        self.mode = routing_mode(self.moma_config)
        self.model = Transformer(self.moma_config, ep_size=1)
        self.moma_generator = None  # set by from_pretrained (needs the export's vocabulary)
        self.moma_source = None  # the export directory it was loaded from

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """Weights through moma's own loader (clean names, shards, damaged files named)."""
        import os

        from moma.pipeline.training.export import load_exported

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.get("revision"))
        if config is None or not isinstance(config, MomaConfig):
            config = MomaConfig.from_pretrained(path)
        routing_mode(ModelConfig.from_json(config.moma))  # refuse before reading any weights
        model = cls(config)
        model.model = load_exported(path)
        model.moma_generator = _generator(path, model.model)
        model.moma_source = path
        dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()

    def save_pretrained(self, save_directory, max_shard_size="5GB", **kwargs):
        """A moma export again (clean names, shards past `max_shard_size`, the source export's
        vocabulary, tokenizers and code), so from_pretrained, `moma.load` and `moma generate` read it."""
        import os
        import shutil
        from pathlib import Path

        from moma.pipeline.training.export import export_names, parse_size, write_weights

        if getattr(self, "moma_source", None) is None:
            raise ValueError("save_pretrained needs the export this model was loaded from (from_pretrained)")
        os.makedirs(save_directory, exist_ok=True)
        src, out = os.path.abspath(self.moma_source), os.path.abspath(save_directory)
        state = self.model.state_dict()
        names = export_names(state)
        write_weights(Path(out), {names[k]: v.detach().cpu() for k, v in state.items()},
                      {"source": src}, parse_size(max_shard_size))
        if src != out:
            for name in ("vocab.json", "tokenizers.json", "export.json", "configuration_moma.py", "modeling_moma.py"):
                if os.path.exists(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
            if os.path.isdir(os.path.join(src, "tokenizers")):
                shutil.copytree(os.path.join(src, "tokenizers"), os.path.join(out, "tokenizers"), dirs_exist_ok=True)
        self.config.save_pretrained(out)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    def _init_weights(self, module):
        pass  # weights come from the export (moma's Transformer initialises itself)

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=None,
                return_dict=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("moma's model takes no padding mask: pass one sequence, or sequences of equal length")
        routing = self.model.routing(input_ids, mode=self.mode)
        targets = None
        if labels is not None:  # transformers' labels are the inputs themselves; moma's are shifted
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        out = self.model(input_ids, targets, return_logits=True, routing=routing)
        loss = None
        if targets is not None:
            n = sum(int(v) for v in out.tokens.values())
            loss = sum(out.ce_sum.values()) / max(n, 1)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=None)

    def generate(self, *args, logits_processor=None, **kwargs):
        """transformers' generate with moma's grammar (image codes only inside images, then <|eoi|>)."""
        processors = LogitsProcessorList(logits_processor or [])
        if self.moma_generator is not None:
            processors.append(MomaGrammar(self.moma_generator))
        kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        return super().generate(*args, logits_processor=processors, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}

    def _supports_default_dynamic_cache(self):
        return False
