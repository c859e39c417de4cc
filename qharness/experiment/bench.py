"""The cost of each scheme beside its quality: prefill and decode throughput, peak memory and weight bytes, per
(model, scheme, backend), eager or under torch.compile, written as leaderboard rows of their own kind.

    qharness bench --model smollm2-135m --quant int8-weight-channel,int4-weight-g128      # CPU: sim's costs
    qharness bench --model random:llama-3-8b --layers 4 --device cuda --quant int4-weight-g128-tinygemm --compile

What is measured, each after warm-up runs (which also compile), the median of `repeats` timed runs:
- prefill: `prefill_batch` sequences of `prefill_tokens` random tokens in one forward pass, no cache;
- decode at each batch size of `decode_batches`: a prompt of `prompt_tokens` fills a static KV cache (not timed),
  then `decode_steps` one-token steps are timed (greedy); under --compile the step is compiled with CUDA graphs
  (mode reduce-overhead) on CUDA;
- peak memory: torch.cuda.max_memory_allocated over the scheme's measurements (CUDA only: a CPU process has no
  allocator high-water mark to reset per scheme);
- weight bytes: what the decoder Linears need in the scheme's format (qharness.quant.footprint) plus every other
  parameter as stored.
Rows: task `bench:eager` or `bench:compile`, metric `prefill_tok_s`, `decode_b<N>_tok_s`, `peak_mem_bytes`,
`weight_bytes`; `fp_value` is the unquantized model's, so `rel_delta` is the speed-up minus one. The device's name
and the shapes are hashed into `task_hash`, so an H200's rows never make another GPU's run skip. `backend` sim
(fake quantization) times the reference arithmetic, not a kernel: its rows have metric_kind `cost-simulated` and
the printed table says so. `random:<shape>` builds a random model of a published shape (speed does not depend on the
weights' values); its quality rows would mean nothing, so only `bench` takes it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import inspect
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qharness.core import provenance
from qharness.core.errors import ConfigError
from qharness.data.results import BASELINE, BENCH_TASK, Row, append_rows, check_writable, existing_keys, key, make_row
from qharness.experiment.shapes import model_shapes, shapes_of
from qharness.models.sources import LoadedModel, ModelSpec, dtype_name, load_model, resolve_device, resolve_dtype
from qharness.quant import SCHEMES, QuantScheme, convert_conv1d_, get_scheme, quantize_, target_linears, weight_bytes
from qharness.quant.backends import QuantContext, load_backends, select_backend

RANDOM = "random:"
# published shapes (config.json of each model): hidden, intermediate, heads, kv heads, layers, vocab
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "llama-3-8b": (4096, 14336, 32, 8, 32, 128256),
    "llama-3.2-1b": (2048, 8192, 32, 8, 16, 128256),
    "smollm2-135m": (576, 1536, 9, 3, 30, 49152),
}


@dataclass(frozen=True)
class BenchSettings:
    model: ModelSpec = field(default_factory=ModelSpec)
    quants: tuple[str, ...] = ("int8-weight-channel",)
    backend: str = "auto"
    compile: bool = False
    layers: int | None = None  # random: models only: how many decoder layers (default: the published count)
    prefill_batch: int = 1
    prefill_tokens: int = 512
    decode_batches: tuple[int, ...] = (1, 16)
    prompt_tokens: int = 64
    decode_steps: int = 16
    repeats: int = 3
    seed: int = 0
    results: Path = Path("results/leaderboard.csv")
    force: bool = False

    def __post_init__(self) -> None:
        for name in ("prefill_batch", "prefill_tokens", "prompt_tokens", "decode_steps", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench: {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise ConfigError(f"bench: decode batch sizes must be >= 1, got {self.decode_batches}")
        if self.layers is not None and (self.layers < 1 or not self.model.name.startswith(RANDOM)):
            raise ConfigError("bench: --layers sets a random: model's depth (>= 1); a real model has its own")
        if self.model.name.startswith(RANDOM) and self.model.name[len(RANDOM):] not in SHAPES:
            raise ConfigError(f"unknown random model shape '{self.model.name[len(RANDOM):]}'; known: "
                              f"{', '.join(RANDOM + s for s in SHAPES)}")

    @property
    def mode(self) -> str:
        return "compile" if self.compile else "eager"


def _random_config(settings: BenchSettings) -> Any:
    from transformers import LlamaConfig

    hidden, intermediate, heads, kv_heads, layers, vocab = SHAPES[settings.model.name[len(RANDOM):]]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, num_hidden_layers=settings.layers or layers, vocab_size=vocab,
                       max_position_embeddings=8192, tie_word_embeddings=False)


def random_model(settings: BenchSettings) -> LoadedModel:
    """A Llama of a published shape with random weights, in the requested dtype on the device."""
    from transformers import LlamaForCausalLM

    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.dtype, device)
    torch.manual_seed(settings.seed)
    with torch.device(device):
        model = LlamaForCausalLM(_random_config(settings)).to(dtype).eval()
    shape = settings.model.name[len(RANDOM):]
    return LoadedModel(model, None, settings.model, f"random weights, {shape} shape", device, dtype, arch="llama")


def planned_targets(settings: BenchSettings) -> dict[str, Any] | None:
    """The Linears a scheme will quantize, as weightless stand-ins, known before any weight loads (a random shape's
    meta skeleton, or the model's config as `run`'s plan reads it); None where only loading can tell."""
    if settings.model.name.startswith(RANDOM):
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            return shapes_of(LlamaForCausalLM(_random_config(settings))).meta_linears()
    shapes = model_shapes(settings.model.name)
    return shapes.meta_linears() if shapes is not None else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed ones (which also compile)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _compiled(fn: Callable[..., Any], settings: BenchSettings, device: torch.device, decode: bool) -> Callable:
    if not settings.compile:
        return fn
    # CUDA graphs pay off for decode's many small launches; prefill is one large graph either way
    mode = "reduce-overhead" if decode and device.type == "cuda" else "default"
    return torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)


def measure(model: Any, settings: BenchSettings, device: torch.device, vocab: int) -> dict[str, float]:
    """Throughputs in tokens per second, and the CUDA memory peak, of `model` as it stands."""
    from transformers import StaticCache

    generator = torch.Generator().manual_seed(settings.seed)
    results: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = 2 if settings.compile else 1
    ids = torch.randint(0, vocab, (settings.prefill_batch, settings.prefill_tokens), generator=generator).to(device)
    prefill = _compiled(lambda: model(input_ids=ids, use_cache=False).logits, settings, device, decode=False)
    with torch.inference_mode():
        seconds = _timed(prefill, device, warmup, settings.repeats)
    results["prefill_tok_s"] = ids.numel() / seconds

    # transformers renames past_key_values to cache (5.24 warns): pass whichever this version's forward takes
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step = _compiled(lambda tokens, cache, position: model(input_ids=tokens, **{cache_arg: cache},
                                                          cache_position=position, use_cache=True).logits,
                     settings, device, decode=True)
    for batch in settings.decode_batches:
        prompt = torch.randint(0, vocab, (batch, settings.prompt_tokens), generator=generator).to(device)
        cache = StaticCache(config=model.config, max_cache_len=settings.prompt_tokens + settings.decode_steps)
        positions = [torch.tensor([settings.prompt_tokens + i], device=device) for i in range(settings.decode_steps)]

        def generate(prompt: torch.Tensor = prompt, cache: Any = cache, positions: list = positions) -> None:
            cache.reset()
            logits = model(input_ids=prompt, **{cache_arg: cache}, use_cache=True,
                           cache_position=torch.arange(settings.prompt_tokens, device=device)).logits
            tokens = logits[:, -1:].argmax(-1)
            _sync(device)
            generate.start = time.perf_counter()  # the prompt is not part of decode's time
            for position in positions:
                tokens = step(tokens, cache, position)[:, -1:].argmax(-1)

        with torch.inference_mode():
            for _ in range(warmup):
                generate()
            _sync(device)
            seconds = []
            for _ in range(settings.repeats):
                generate()
                _sync(device)
                seconds.append(time.perf_counter() - generate.start)
        results[f"decode_b{batch}_tok_s"] = batch * settings.decode_steps / statistics.median(seconds)
    if device.type == "cuda":
        results["peak_mem_bytes"] = float(torch.cuda.max_memory_allocated(device))
    return results


def _model_bytes(model: Any, targets: dict[str, Any], scheme: QuantScheme | None) -> int:
    quantized = {id(linear.weight) for linear in targets.values()}
    others = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized)
    return others + weight_bytes(targets, scheme)


def _task_hash(settings: BenchSettings, device: torch.device) -> str:
    shape = {k: getattr(settings, k) for k in ("prefill_batch", "prefill_tokens", "decode_batches", "prompt_tokens",
                                               "decode_steps", "layers")}
    text = json.dumps({"device": provenance.device_description(device), **shape}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


HIGHER_IS_BETTER = {"peak_mem_bytes": False, "weight_bytes": False}


@dataclass
class BenchReport:
    rows: list[Row]
    computed: int


def bench(settings: BenchSettings, say: Callable[[str], None] = print) -> BenchReport:
    check_writable(settings.results)
    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.dtype, device)
    schemes = {SCHEMES.resolve(q): get_scheme(q) for q in settings.quants if q != BASELINE}
    planned = planned_targets(settings)  # chosen once, from the widths the model will have
    backends = {name: select_backend(s, device, settings.backend, dtype=dtype, targets=planned)
                for name, s in schemes.items()}
    task = BENCH_TASK + settings.mode
    task_hash = _task_hash(settings, device)
    metrics = ["prefill_tok_s", *(f"decode_b{b}_tok_s" for b in settings.decode_batches), "weight_bytes"]
    metrics += ["peak_mem_bytes"] if device.type == "cuda" else []

    def row_key(quant: str, backend: str, metric: str) -> tuple[str, ...]:
        return key(make_row(model=settings.model.name, quant=quant, backend=backend, task=task, task_hash=task_hash,
                            metric=metric, bos=True, context_length=settings.prefill_tokens, dtype=dtype_name(dtype),
                            device_type=device.type, keep="", kv="", transform="", limit=None))

    cells = [(BASELINE, "")] + [(name, backends[name]) for name in schemes]
    done = {} if settings.force else existing_keys(settings.results)
    # the baseline's speeds are every row's fp_value, measured in the same process: a run measures all or nothing
    todo = [(q, b) for q, b in cells if any(row_key(q, b, m) not in done for m in metrics)]
    if not todo:
        say(f"all bench rows are already in {settings.results}; pass --force to recompute")
        return BenchReport([done[row_key(q, b, m)] for q, b in cells for m in metrics], 0)

    say(f"loading {settings.model.name} ...")
    loaded = random_model(settings) if settings.model.name.startswith(RANDOM) else load_model(settings.model)
    vocab = loaded.model.config.vocab_size
    convert_conv1d_(loaded.model)  # GPT-2's Conv1D as the Linears every backend quantizes
    targets = target_linears(loaded.model)
    if planned is None:  # widths unknown before loading: each chosen backend is checked against them now
        for name, scheme in schemes.items():
            load_backends().get(backends[name]).check(device, scheme, dtype, targets)
    rows: list[Row] = []
    baseline: dict[str, float] = {}
    for quant, backend in cells:  # the baseline first, on the device; then it waits on the CPU, and each scheme
        scheme = schemes.get(quant)  # quantizes a copy moved from there: one model on the device at a time
        say(f"measuring {quant}" + (f" [{backend}]" if backend else "") + f" ({settings.mode}) ...")
        model = loaded.model
        if scheme is not None:
            model = copy.deepcopy(loaded.model).to(device)
            context = QuantContext(device, calibration=lambda: [torch.randint(0, vocab, (1, 128)).to(device)])
            quantize_(model, scheme, backend=backend, context=context)
        start = time.perf_counter()
        measured = measure(model, settings, device, vocab)
        measured["weight_bytes"] = float(_model_bytes(loaded.model, targets, scheme))
        seconds = time.perf_counter() - start
        if quant == BASELINE:
            baseline = measured
            loaded.model.to("cpu")
        kind = "cost-simulated" if backend == "sim" else "cost"
        new = [make_row(
            measured[metric], baseline[metric], model=settings.model.name, quant=quant, backend=backend, keep="",
            kv="", transform="", task=task, task_hash=task_hash, metric=metric, bos=True,
            context_length=settings.prefill_tokens, limit=None, dtype=dtype_name(dtype), device_type=device.type,
            higher_is_better=HIGHER_IS_BETTER.get(metric, True), metric_kind=kind, arch=loaded.arch,
            mitigation=loaded.mitigation, family=loaded.family, model_source=loaded.source,
            scheme=scheme.to_dict() if scheme else None, seed=settings.seed, seconds=f"{seconds:.1f}",
            **provenance.row_fields(device)) for metric in metrics]
        append_rows(settings.results, new)
        rows += new
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return BenchReport(rows, len(todo))


def format_table(rows: list[Row]) -> str:
    """One line per (scheme, backend): each metric with its ratio to the unquantized model."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    lines = [f"{'quant':28} {'backend':8} " + " ".join(f"{m:>22}" for m in metrics)]
    cells = list(dict.fromkeys((r["quant"], r["backend"]) for r in rows))
    simulated = False
    for quant, backend in cells:
        values = {r["metric"]: r for r in rows if (r["quant"], r["backend"]) == (quant, backend)}
        parts = []
        for metric in metrics:
            row = values.get(metric)
            if row is None:
                parts.append(f"{'':>22}")
                continue
            value, fp = float(row["value"]), float(row["fp_value"] or "nan")
            shown = f"{value / 2**20:.0f}MiB" if metric.endswith("bytes") else f"{value:.1f}"
            parts.append(f"{shown + (f' ({value / fp:.2f}x)' if quant != BASELINE and fp else ''):>22}")
        simulated |= backend == "sim"
        label = backend + ("*" if backend == "sim" else "")
        lines.append(f"{quant:28} {label:8} " + " ".join(parts))
    if simulated:
        lines.append("* sim is fake quantization (the reference arithmetic): its times are a simulation's, not a "
                     "kernel's cost")
    return "\n".join(lines)
