"""`CaptionConfig`: everything a caption run needs, validated when built, stored in `_run.json`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from workers.schema import DEFAULT_PROMPT

# Fields that must be equal when a run continues an existing output: changing any of them
# would mix captions of different inputs, prompts, decoding options or weights in one table.
IDENTITY_FIELDS = ("input", "id_column", "image_column", "image_uri_column", "prompt",
                   "max_new_tokens", "temperature", "top_p", "top_k", "seed", "commit_rows", "dry_run")
DEFAULT_COMMIT_ROWS = 5000


class PipelineError(ValueError):
    """A problem the user can fix (bad input, duplicate ids, incompatible rerun): one clear line."""


@dataclass(frozen=True)
class CaptionConfig:
    input: str
    output: str
    target: str | None = None        # model dirs; not needed (and ignored) for a dry run
    draft: str | None = None
    s3_endpoint: str | None = None
    id_column: str = "id"
    image_column: str | None = "image"
    image_uri_column: str | None = None
    prompt: str = DEFAULT_PROMPT
    actors_min: int = 1
    actors_max: int | None = 1       # None: one per GPU of the cluster when the run starts (--actors auto)
    gpus_per_actor: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    stage_cpus: float = 0.5          # read, preprocess and write stages (fractions are fine)
    batch_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None         # None: what the target's generate applies (its generation config, else 50)
    seed: int | None = None          # sampling: a row's caption depends only on (seed, id)
    max_concurrent_batches: int = 8  # input batches in flight per caption actor (1 = no continuous batching)
    tree_budget: str = "auto"        # auto: each actor measures the tree per active batch size; off: `tree` always
    compile: str = "auto"            # step graphs (decoding/graphs.py): on, off, auto = on for CUDA only
    kv_memory_gb: float | None = None  # KV plan per actor (decoding/capacity.py); None: 90% of free GPU memory / no plan on CPU
    tree: dict = field(default_factory=dict)  # decoding.TreeConfig fields
    dtype: str = "auto"
    address: str | None = None       # existing Ray cluster; None = the current or a new local one
    commit_rows: int = DEFAULT_COMMIT_ROWS  # rows per committed output file (the unit a kill can lose)
    dry_run: bool = False            # read, decode and check images, commit and write; no model
    device: str = "auto"             # auto: cuda when the actor has GPUs; cpu: decode on CPU on purpose

    def __post_init__(self):
        if self.image_uri_column is not None:
            object.__setattr__(self, "image_column", None)
        if not self.image_column and not self.image_uri_column:
            raise PipelineError("give an image column or an image URI column")
        if not 1 <= self.actors_min <= (self.actors_max if self.actors_max is not None else self.actors_min):
            raise PipelineError(f"--actors needs 1 <= MIN <= MAX, got {self.actors_min},{self.actors_max}")
        if not self.dry_run and not (self.target and self.draft):
            raise PipelineError("a caption run needs --target and --draft (only --dry-run runs without models)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise PipelineError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        for name in ("batch_size", "max_new_tokens", "commit_rows", "max_concurrent_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PipelineError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kv_memory_gb is not None and not self.kv_memory_gb > 0:
            raise PipelineError(f"--kv-memory-gb must be > 0, got {self.kv_memory_gb!r}")
        if self.tree_budget not in ("auto", "off"):
            raise PipelineError(f"--tree-budget must be auto or off, got {self.tree_budget!r}")
        if self.compile not in ("auto", "on", "off"):
            raise PipelineError(f"--compile must be auto, on or off, got {self.compile!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise PipelineError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise PipelineError("temperature must be >= 0 and top_p in (0, 1]")
        if (self.gpus_per_actor or 0) < 0 or self.cpus_per_actor < 0 or self.stage_cpus <= 0:
            raise PipelineError("resource amounts must be positive")
        if self.s3_endpoint and "@" in self.s3_endpoint:
            raise PipelineError("--s3-endpoint must not contain credentials; use the AWS env/config")
        from decoding import TreeConfig
        from decoding.dtypes import canonical_dtype
        try:
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
        try:
            TreeConfig(**self.tree)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"bad tree option: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "CaptionConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def identity(self) -> dict:
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}
