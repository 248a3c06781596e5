"""Evaluation: sample the student and each route's teacher on the same conditions and noise, score both
with the suite's judges, report T2I diversity beside accuracy, and draw the comparison grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from danceopd.config import EvalConfig, RouteConfig
from danceopd.fields.base import Conditions, VelocityField
from danceopd.data.buckets import bucket_name
from danceopd.flow import grid_for, rollout_states, sigma_schedule
from danceopd.seeding import generator
from danceopd.suite import CapabilitySuite
from danceopd.suite.judges import diversity

T2I_LIKE = ("t2i", "realism", "uncond")


def sample(field: VelocityField, conditions: Conditions, steps: int, seed: int, schedule: str = "uniform",
           shift: float = 1.0, batch: int = 128, device: str | torch.device = "cpu", sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Euler samples from fresh seeded noise, one per condition, computed in chunks of `batch` (at the conditions'
    bucket shape where they have one)."""
    c, h, w = conditions.shape or field.info.sample_shape
    noise = torch.randn(len(conditions), c, h, w, generator=generator(seed, "eval-noise"))
    sigmas = sigma_schedule(steps, schedule, shift) if sigmas is None else grid_for(sigmas, conditions.shape)
    out = []
    for i in range(0, len(conditions), batch):
        sub = conditions.select(slice(i, i + batch)).to(device)
        traj = rollout_states(lambda x, s: field.velocity(x, s, sub), noise[i:i + batch].to(device), sigmas)
        out.append(traj.final.float().cpu())
    return torch.cat(out)


def evaluate(student: VelocityField, teachers: dict[str, VelocityField], routes: dict[str, RouteConfig],
             suite: CapabilitySuite, cfg: EvalConfig, device="cpu", grid_path: Path | None = None) -> dict:
    entries, blocks = judge_routes(student, teachers, routes, suite, cfg, device, grid=grid_path is not None)
    report: dict = {"tier": suite.tier.name, "sampling_steps": cfg.sampling_steps, "routes": entries}
    if grid_path is not None:
        save_grid(blocks, grid_path)
        report["grid"] = str(grid_path)
    return report


def judge_routes(student: VelocityField, teachers: dict[str, VelocityField], routes: dict[str, RouteConfig],
                 suite: CapabilitySuite, cfg: EvalConfig, device="cpu", grid: bool = False) -> tuple[dict, list]:
    """The suite's judges (and T2I diversity) on teacher and student samples of each route; with `grid`, also each
    route's grid block. Returns ({route: entry}, [(route, rows)])."""
    entries, blocks = {}, []
    for name, route in routes.items():
        cap = route.capability
        cond = suite.bucket(cap).evaluation_set(cfg.samples_per_capability, seed=cfg.seed)
        with torch.no_grad():
            t_samples = sample(teachers[name], cond, cfg.sampling_steps, cfg.seed, cfg.schedule, cfg.shift, device=device)
            s_samples = sample(student, cond, cfg.sampling_steps, cfg.seed, cfg.schedule, cfg.shift, device=device)
        t_judge, s_judge = suite.judge(cap, t_samples, cond), suite.judge(cap, s_samples, cond)
        entry = {"capability": cap, "samples": len(cond), "teacher": t_judge, "student": s_judge,
                 "score_ratio": s_judge["score"] / t_judge["score"] if t_judge["score"] > 0 else None}
        if cap in ("t2i", "realism"):
            refs = suite.field(cap).references
            td, sd = diversity(t_samples, cond.prompts, refs), diversity(s_samples, cond.prompts, refs)
            entry["diversity"] = {"teacher": td, "student": sd,
                                  "coverage_vs_teacher": sd["modes_hit"] / max(td["modes_hit"], 1)}
        entries[name] = entry
        if grid:
            blocks.append((name, _grid_block(student, teachers[name], suite, cap, cfg, device)))
    return entries, blocks


def _grid_block(student, teacher, suite, cap, cfg: EvalConfig, device, conditions_shown: int = 3):
    """Rows of: condition | n teacher samples | n student samples (same condition, different noise)."""
    n = cfg.samples_per_condition_in_grid
    base = suite.bucket(cap).evaluation_set(conditions_shown * 8, seed=cfg.seed + 1)
    # Distinct instructions/prompts first, so that the rows show different conditions.
    pick, seen = [], set()
    for i, p in enumerate(base.prompts):
        if p not in seen and len(pick) < conditions_shown:
            pick.append(i)
            seen.add(p)
    pick += [i for i in range(len(base)) if i not in pick][: conditions_shown - len(pick)]
    base = base.select(pick)
    cond = base.repeat(n)
    with torch.no_grad():
        t = sample(teacher, cond, cfg.sampling_steps, cfg.seed + 7, cfg.schedule, cfg.shift, device=device)
        s = sample(student, cond, cfg.sampling_steps, cfg.seed + 7, cfg.schedule, cfg.shift, device=device)
    rows = []
    for i in range(len(base)):
        src = base.source[i] if base.source is not None else None
        rows.append((base.prompts[i], src, t[i * n:(i + 1) * n], s[i * n:(i + 1) * n]))
    return rows


GRID_CELL = 64  # pixels per image in the grids


def shrink_blocks(blocks: list, cell: int = GRID_CELL) -> list:
    """Grid blocks with every image already at the grid's cell size (antialiased): what a worker sends to rank 0 is
    a few KB per image instead of a decoded 1024 px one (12 MB in fp32)."""
    import torch.nn.functional as F

    def small(images):  # [C, H, W] or [N, C, H, W]
        if images is None or images.shape[-1] <= cell:
            return images
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        out = F.interpolate(batch.float(), size=(cell, cell), mode="bilinear", antialias=True, align_corners=False)
        return out[0] if images.dim() == 3 else out

    return [(name, [(prompt, small(src), small(t), small(s)) for prompt, src, t, s in rows]) for name, rows in blocks]


def _to_pil(img: torch.Tensor, cell: int) -> Image.Image:
    """A [-1, 1] image as a cell x cell tile: small suite images upscaled crisply, large decoded ones downscaled."""
    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    return im.resize((cell, cell), Image.NEAREST if im.width <= cell else Image.BILINEAR)


def save_grid(blocks, path: Path, cell: int = GRID_CELL, pad: int = 4, text_w: int = 150) -> Path:
    """PNG: per route a titled block; each row = condition text (+ source) | teacher samples | student samples."""
    n = len(blocks[0][1][0][2]) if blocks else 1
    width = text_w + cell + pad + 2 * n * (cell + pad) + pad * 3
    rows = sum(len(b[1]) for b in blocks)
    height = rows * (cell + pad) + len(blocks) * 18 + 20
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((text_w + cell + 2 * pad, 2), "teacher samples", fill=(0, 0, 0))
    draw.text((text_w + cell + 3 * pad + n * (cell + pad), 2), "student samples", fill=(0, 0, 0))
    y = 16
    for name, rows_ in blocks:
        draw.text((2, y), f"[{name}]", fill=(160, 0, 0))
        y += 16
        for prompt, src, t, s in rows_:
            words, lines, line = prompt.split() or ["(unconditional)"], [], ""
            for w in words:
                if len(line) + len(w) > 22:
                    lines.append(line)
                    line = ""
                line = (line + " " + w).strip()
            lines.append(line)
            draw.text((2, y + 2), "\n".join(lines), fill=(0, 0, 0))
            if src is not None:
                canvas.paste(_to_pil(src, cell), (text_w, y))
            x = text_w + cell + 2 * pad
            for img in t:
                canvas.paste(_to_pil(img, cell), (x, y))
                x += cell + pad
            x += pad
            for img in s:
                canvas.paste(_to_pil(img, cell), (x, y))
                x += cell + pad
            y += cell + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def summary_table(report: dict) -> str:
    """Per route: judge scores where the suite judges the run, and the velocity error (before -> after where known)."""
    before = (report.get("before") or {}).get("routes", {})
    lines = [f"{'route':<14}{'capability':<13}{'teacher':>9}{'student':>9}{'ratio':>7}  {'velocity error':<22} extra"]
    for name, e in report["routes"].items():
        verr = "" if e.get("velocity_error") is None else f"{e['velocity_error']:.4f}"
        if before.get(name, {}).get("velocity_error") is not None:
            verr = f"{before[name]['velocity_error']:.4f} -> {verr}"
        if "teacher" not in e:  # a model family without judges: the velocity error is the score
            lines.append(f"{name:<14}{'-':<13}{'-':>9}{'-':>9}{'-':>7}  {verr:<22}")
            continue
        extra = ""
        if "diversity" in e:
            d = e["diversity"]
            extra = f"modes hit {d['student']['modes_hit']}/{d['teacher']['modes_hit']} (coverage {d['coverage_vs_teacher']:.2f})"
        if "psnr_db" in e["student"]:
            extra = f"PSNR {e['student']['psnr_db']:.1f} dB (teacher {e['teacher']['psnr_db']:.1f})"
        ratio = "n/a" if e["score_ratio"] is None else f"{e['score_ratio']:.2f}"
        lines.append(f"{name:<14}{e['capability']:<13}{e['teacher']['score']:>9.3f}{e['student']['score']:>9.3f}{ratio:>7}  {verr:<22} {extra}")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None))
    return path


def velocity_error(student: VelocityField, teacher: VelocityField, cond: Conditions, sigmas: torch.Tensor, seed: int,
                   device: str | torch.device = "cpu", batch: int = 32) -> float:
    """The student's relative velocity error against a teacher on held-out states: sum |v_s - v_t|^2 / sum |v_t|^2
    over every state of the teacher's own rollout (fresh seeded noise, held-out conditions). Scale-free, so it
    means the same for the pixel model and a 1024 px latent model; 0 = the teacher's field, 1 = as far as zero."""
    c, h, w = cond.shape or teacher.info.sample_shape
    sigmas = grid_for(sigmas, cond.shape)
    noise = torch.randn(len(cond), c, h, w, generator=generator(seed, "velocity-error-noise"))
    err = ref = 0.0
    with torch.no_grad():
        for i in range(0, len(cond), batch):
            sub = cond.select(slice(i, i + batch)).to(device)
            traj = rollout_states(lambda x, s: teacher.velocity(x, s, sub), noise[i:i + batch].to(device), sigmas)
            for k in range(traj.num_steps):
                x, s = traj.states[k], traj.sigmas[k].expand(traj.states.shape[1])
                vt, vs = teacher.velocity(x, s, sub).float(), student.velocity(x, s, sub).float()
                err += float(((vs - vt) ** 2).sum())
                ref += float((vt ** 2).sum())
    return err / max(ref, 1e-12)


def evaluate_run(student, teachers: dict[str, VelocityField], cfg, suite: CapabilitySuite | None, data: dict, sigmas: torch.Tensor,
                 device="cpu", grid_path: Path | None = None, cell: int = GRID_CELL) -> dict:
    """The evaluation of any run: the suite's judges and diversity where the student is the suite's pixel model on
    suite data, and for every family each route's velocity error (held-out conditions, the training grid) and a
    grid of condition | teacher samples | student samples decoded through the VAE."""
    entries, blocks = evaluate_routes(student, teachers, cfg, suite, data, sigmas, list(cfg.routes), device, grid=grid_path is not None)
    return assemble_report(student, cfg, entries, blocks, grid_path, cell)


def evaluate_routes(student, teachers: dict[str, VelocityField], cfg, suite: CapabilitySuite | None, data: dict, sigmas: torch.Tensor,
                    routes: list[str], device="cpu", grid: bool = False) -> tuple[dict, list]:
    """Part of a run's evaluation: these routes only (the distributed job shares its routes among the workers).
    Returns ({route: entry}, [(route, grid rows)]); `assemble_report` joins the parts."""
    e = cfg.eval
    judged = student.family.name == "pixel" and cfg.manifest is None
    if judged:
        entries, blocks = judge_routes(student.field, teachers, {n: cfg.routes[n] for n in routes}, suite, e, device=device, grid=grid)
    else:
        entries, blocks = {n: {} for n in routes}, []
    for name in routes:
        sets = data[name].evaluation_sets(e.velocity_error_samples, e.seed + 101)
        errors = {size: velocity_error(student.field, teachers[name], cond, sigmas, e.seed, device) for size, cond in sets.items()}
        if None in errors:
            entries[name]["velocity_error"] = errors[None]
        else:  # aspect-ratio buckets: each bucket's error, and their mean weighted by the buckets' shares of the draws
            shares = data[name].size_shares() or {}
            weights = {b: shares.get(b, 0.0) for b in errors}
            total = sum(weights.values())
            entries[name]["velocity_error"] = (sum(weights[b] * v for b, v in errors.items()) / total if total
                                               else sum(errors.values()) / len(errors))
            entries[name]["velocity_error_by_bucket"] = {bucket_name(b): v for b, v in errors.items()}
    if e.clip_model is not None:
        for name in routes:
            entries[name]["clip_score"] = clip_scores(student, teachers[name], data[name], e, device)
    if not judged and grid:
        blocks = [(name, _latent_grid_block(student, teachers[name], data[name], e, device)) for name in routes]
    return entries, blocks


def assemble_report(student, cfg, entries: dict, blocks: list, grid_path: Path | None = None, cell: int = GRID_CELL) -> dict:
    """One report from the routes' entries (and grid blocks), in the config's route order."""
    e = cfg.eval
    judged = student.family.name == "pixel" and cfg.manifest is None
    head = {"tier": cfg.suite.tier} if judged else {"family": student.family.name}
    report = {**head, "sampling_steps": e.sampling_steps, "routes": {n: entries[n] for n in cfg.routes if n in entries}}
    if e.clip_model is not None:
        report["clip_model"] = e.clip_model
    if grid_path is not None:
        order = {n: i for i, n in enumerate(cfg.routes)}
        save_grid(sorted(blocks, key=lambda b: order[b[0]]), grid_path, cell=cell)
        report["grid"] = str(grid_path)
    return report


def clip_scores(student, teacher, data, e: EvalConfig, device) -> dict | None:
    """Teacher and student CLIP scores on the route's held-out prompts (decoded samples; None for unprompted routes)."""
    from danceopd.clip_score import ClipScorer

    cond = data.evaluation_set(e.velocity_error_samples, e.seed + 202)
    if not any(cond.prompts):
        return None
    scorer = ClipScorer(e.clip_model, device)
    t, s = _decoded_samples(student, teacher, cond, e, e.seed + 9, device)
    return {"teacher": scorer(t, cond.prompts), "student": scorer(s, cond.prompts)}


def _decoded_samples(student, teacher, cond: Conditions, e: EvalConfig, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student samples from the same noise, decoded to [-1, 1] images through the student's VAE."""
    sigmas = eval_sigmas(e, student, cond.shape)
    with torch.no_grad():
        t = decode(student, sample(teacher, cond, e.sampling_steps, seed, sigmas=sigmas, device=device))
        s = decode(student, sample(student.field, cond, e.sampling_steps, seed, sigmas=sigmas, device=device))
    return t, s


DECODE_CHUNK = 4  # images per VAE decode: at 1024 px the decoder's activations are ~1.5-2 GB per image (bf16)


def decode(student, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> [-1, 1] images on the CPU, a few at a time (a whole evaluation batch at 1024 px would not fit
    beside a training worker's state)."""
    return torch.cat([student.decode_latents(latents[i:i + DECODE_CHUNK]).cpu() for i in range(0, len(latents), DECODE_CHUNK)])


def _latent_grid_block(student, teacher, data, e: EvalConfig, device, conditions_shown: int = 3):
    n = e.samples_per_condition_in_grid
    base = data.evaluation_set(conditions_shown, e.seed + 1)
    t, s = _decoded_samples(student, teacher, base.repeat(n), e, e.seed + 7, device)
    with torch.no_grad():
        src = None if base.source is None else decode(student, base.source.to(device))
    return [(base.prompts[i], None if src is None else src[i], t[i * n:(i + 1) * n], s[i * n:(i + 1) * n]) for i in range(len(base))]


def eval_sigmas(e: EvalConfig, student, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    if e.schedule == "family":
        return student.family.default_sigmas(student.pipe, e.sampling_steps, shape or student.field.info.sample_shape)
    return sigma_schedule(e.sampling_steps, e.schedule, e.shift)


def sample_cell(cfg) -> int:
    """The tile side of training-time sample grids: the training resolution (the pixel model: the usual cell), at most
    eval.sample_size."""
    size = GRID_CELL if cfg.student.model_family.name == "pixel" else cfg.student.resolution
    return min(size, cfg.eval.sample_size)


def samples_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "samples" / f"step-{step:06d}.png"


__all__ = ["GRID_CELL", "samples_path", "sample_cell", "shrink_blocks", "assemble_report", "evaluate", "evaluate_routes", "evaluate_run", "judge_routes", "sample", "save_grid", "summary_table", "velocity_error", "write_report"]
