"""Every knob of a benchmark run: the geometry of the models under test, the sections, and the timing schedules."""

from __future__ import annotations

from dataclasses import dataclass, field


# The sections in the order they run (and the choices of `--sections`); `run.SECTIONS` says what each one does.
SECTION_NAMES = ("encoder", "profile", "early_exit", "single_image", "preprocessing", "pipeline")


@dataclass
class Schedule:
    """Warm-up rounds (not recorded) and timed trials for one batch size."""

    batch_size: int
    warmup: int
    trials: int


@dataclass
class BenchmarkSettings:
    """Every knob of a benchmark run; `asdict(settings)` goes into the JSON report.

    The defaults are the full CPU run: ViT-B/16 geometry (width 768, 12 layers, 12 heads, MLP 3072, 224 px, patch
    16, projection 512) against WaveCLIP at the same width with cells of 32 px and one DWT level; a CLIP-sized text
    tower (12 layers, width 512, 8 heads) for the pipelines; 1,000 labels.
    """

    # Vision geometry, shared by CLIP and WaveCLIP.
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    projection_dim: int = 512
    cell_size: int = 32
    levels: int = 1
    # Text tower of the pipelines (CLIP ViT-B/16's is 12 layers, width 512, 8 heads, MLP 2048).
    text_hidden_size: int = 512
    text_num_hidden_layers: int = 12
    text_num_attention_heads: int = 8
    text_intermediate_size: int = 2048
    text_max_length: int = 77
    attn_implementation: str = "sdpa"
    sections: tuple[str, ...] = SECTION_NAMES
    profile_batch_size: int = 8  # torch.profiler of one call per encoder configuration
    # Encoder: (batch size, warm-up rounds, trials). Fewer trials where one round costs minutes.
    cpu_schedules: tuple[Schedule, ...] = (
        Schedule(1, 2, 10),
        Schedule(4, 1, 8),
        Schedule(8, 1, 6),
        Schedule(64, 1, 3),
    )
    gpu_schedules: tuple[Schedule, ...] = (Schedule(1, 5, 20), Schedule(64, 3, 10), Schedule(512, 2, 5))
    gpu_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    # `torch.compile` backend of the compiled encoder configurations (None: eager only). Compiling both encoders
    # takes minutes on a 2-core CPU, once per run (the first call of each graph, recorded as first_call_seconds).
    compile_backend: str | None = "inductor"
    use_gpu: bool = True
    # Early exit: forced exit fractions at one batch size.
    exit_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    cpu_early_exit: Schedule = field(default_factory=lambda: Schedule(64, 1, 3))
    gpu_early_exit: Schedule = field(default_factory=lambda: Schedule(512, 2, 5))
    # One image at a time (and a small batch), in every mode: eager, compiled, int8, ONNX Runtime, ONNX int8.
    single_image_schedules: tuple[Schedule, ...] = (Schedule(1, 3, 15), Schedule(8, 1, 5))
    # Preprocessing: one image per call, and a batch per call.
    preprocessing_single: Schedule = field(default_factory=lambda: Schedule(1, 2, 10))
    preprocessing_batch: Schedule = field(default_factory=lambda: Schedule(32, 1, 5))
    # Pipelines.
    num_labels: int = 1000
    pipeline_images: int = 16
    stock_pipeline_images: int = 4  # each one re-encodes every prompt: the costliest calls of the run
    pipeline_rounds: int = 3  # interleaved rounds of every pipeline run (the cold first call is measured once)
    pipeline_batch_sizes: tuple[int, ...] = (1, 16)  # the pipelines' `batch_size` (1 is their default)
    pipeline_int8: bool = True  # also both pipelines with their image sides in dynamic int8 (batch_size 1)
    high_threshold: float = 1.01
    seed: int = 0
    # On a shared machine: before each section wait (at most this long) until other processes keep fewer than
    # `idle_busy_cores` cores busy. 0 = do not wait. Contention is recorded either way.
    wait_for_idle_seconds: float = 0.0
    idle_busy_cores: float = 0.3

    @property
    def is_vit_b16(self) -> bool:
        return (
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
            self.image_size,
            self.patch_size,
        ) == (768, 12, 12, 3072, 224, 16)


def quick_settings() -> BenchmarkSettings:
    """Every section at a narrow geometry, tiny batches and one or two trials: a smoke run of the whole suite."""
    vision = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    text = dict(text_hidden_size=128, text_num_hidden_layers=2, text_num_attention_heads=4, text_intermediate_size=256)
    return BenchmarkSettings(
        **vision,
        **text,
        projection_dim=128,
        cpu_schedules=(Schedule(1, 1, 2), Schedule(4, 1, 2)),
        gpu_schedules=(Schedule(1, 1, 3), Schedule(64, 1, 3)),
        cpu_early_exit=Schedule(8, 1, 2),
        single_image_schedules=(Schedule(1, 1, 2), Schedule(2, 1, 2)),
        gpu_early_exit=Schedule(64, 1, 2),
        preprocessing_single=Schedule(1, 1, 2),
        preprocessing_batch=Schedule(8, 1, 2),
        profile_batch_size=2,
        num_labels=100,
        pipeline_images=4,
        stock_pipeline_images=2,
        pipeline_rounds=1,
        pipeline_batch_sizes=(1, 4),
        compile_backend=None,
    )


def geometry_label(settings: BenchmarkSettings) -> str:
    """One line naming the models under test, for the report's header."""
    vit = (
        "ViT-B/16"
        if settings.is_vit_b16
        else (f"ViT width {settings.hidden_size}, {settings.num_hidden_layers} layers, patch {settings.patch_size}")
    )
    return (
        f"{vit} ({settings.image_size} px, projection {settings.projection_dim}) vs WaveCLIP at the same width, "
        f"cell {settings.cell_size}, L={settings.levels}; random weights"
    )
