"""Rich renderings of plans and the method catalog for the CLI."""

from __future__ import annotations

from collections import Counter

from rich.console import Group
from rich.table import Table

from modelfuse.engine.estimate import estimate
from modelfuse.methods import all_methods
from modelfuse.options import MergeOptions
from modelfuse.plan import MergePlan
from modelfuse.units import format_bytes


def _format_value(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plan_table(plan: MergePlan, show: int, options: MergeOptions | None = None) -> Group:
    """Summary, predicted peak memory and time, and a few example tensors with their resolved parameters."""
    options = options or MergeOptions()
    predicted = estimate(plan, options)
    summary = Table(show_header=False, box=None)
    summary.add_row("method", plan.recipe.method)
    summary.add_row("inputs", ", ".join(plan.checkpoints))
    summary.add_row("config from", plan.reference)
    if plan.vocabulary is not None and plan.recipe.tokenizer is not None:
        rows = f", {plan.vocabulary.rows} embedding rows" if plan.vocabulary.rows != plan.vocabulary.size else ""
        summary.add_row("tokenizer", f"built ({plan.recipe.tokenizer.source}): {plan.vocabulary.size} tokens{rows}")
    else:
        summary.add_row("tokenizer from", plan.tokenizer or "none (no input has one)")
    if plan.chat_template is not None:
        summary.add_row("chat template", plan.recipe.chat_template if plan.recipe.chat_template != plan.chat_template
                        else "given (Jinja)")
    summary.add_row("output tensors", str(len(plan.jobs)))
    if plan.module_layers:
        summary.add_row("output layers", ", ".join(f"{name} {count}" for name, count in plan.module_layers.items()))
    else:
        summary.add_row("output layers", str(len(plan.layer_map)))
    summary.add_row("bytes read", format_bytes(plan.read_bytes))
    summary.add_row("bytes written", format_bytes(plan.write_bytes))
    summary.add_row("predicted peak memory", f"{format_bytes(predicted.peak_memory_bytes)} "
                    f"(budget {options.max_memory}, {options.threads} threads)")
    summary.add_row("predicted time", f"{predicted.seconds:.1f} s (warm page cache; rough)")
    dtypes = Counter(str(job.dtype).removeprefix("torch.") for job in plan.jobs)
    summary.add_row("output dtypes", ", ".join(f"{d} x{n}" for d, n in dtypes.items()))
    examples = Table(title="example tensors", show_lines=False)
    for column in ("tensor", "shape", "depth", "sources", "parameters"):
        examples.add_column(column)
    step = max(1, len(plan.jobs) // max(show, 1))
    for job in plan.jobs[::step][:show]:
        sources = ", ".join(f"{s.model}:{s.name}" for s in job.sources)
        if job.base:
            sources += f" (base {job.base.model})"
        params = ", ".join(f"{k}={_format_value(v)}" for k, v in job.params.items())
        examples.add_row(job.name, str(list(job.shape)), f"{job.depth:.2f}", sources, params)
    return Group(summary, examples)


def methods_table() -> Table:
    """Every registered method with its parameters (default, range, per-model) and description."""
    table = Table(title="merge methods", show_lines=True)
    table.add_column("method", style="bold")
    table.add_column("base")
    table.add_column("parameters")
    table.add_column("description")
    for spec in all_methods():
        params = []
        for name, param in spec.params.items():
            default = "required" if param.required else f"default {_format_value(param.default)}"
            scope = ", per model" if param.per_model else ""
            params.append(f"{name}: {param.describe_range()}, {default}{scope}")
        table.add_row(spec.name, spec.base, "\n".join(params) or "-", f"{spec.description}\n{spec.paper}")
    return table
