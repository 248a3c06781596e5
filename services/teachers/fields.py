"""Build the velocity field a teacher config names (inside its replica)."""

from __future__ import annotations

from danceopd.fields.base import VelocityField
from danceopd.fields.operators import CFGField
from danceopd.suite import CapabilitySuite
from danceopd.text_embeddings import TextEmbeddings
from danceopd.teacher_model import AdapterBank, load_teacher_field, native_resolution
from services.teachers.config import AdapterBankSpec, CFGFieldSpec, DiffusersFieldSpec, SuiteFieldSpec, TeacherConfig, TeachersConfig


def build_field(teacher: TeacherConfig, all_teachers: TeachersConfig | None = None) -> VelocityField:
    spec = teacher.field
    if isinstance(spec, SuiteFieldSpec):
        field = CapabilitySuite(spec.tier, spec.tau, spec.seed).field(spec.capability)
        # Served edit teachers insist on a source image: in-process the suite's edit fields fall back to
        # the unconditional field (for soft mixing), which over REST would be a silently wrong answer.
        return _served_copy(field, teacher.name, requires_source=field.info.takes_source)
    if isinstance(spec, DiffusersFieldSpec):
        resolution = spec.resolution or native_resolution(spec.path) or 0
        return load_teacher_field(spec.model_spec(), teacher.name, resolution, device=teacher.device, dtype=teacher.dtype,
                                  text=_store(spec), buckets=spec.buckets)
    if isinstance(spec, AdapterBankSpec):  # several teachers on one base: the replica answers per query's adapter
        resolution = spec.resolution or native_resolution(spec.path) or 0
        return AdapterBank({n: spec.model_spec(n) for n in spec.adapters}, resolution, device=teacher.device, dtype=teacher.dtype,
                           name=teacher.name, cfg_alphas={n: a.cfg_alpha for n, a in spec.adapters.items() if a.cfg_alpha is not None},
                           text=_store(spec), buckets=spec.buckets)
    if isinstance(spec, CFGFieldSpec):
        if all_teachers is None:
            raise ValueError(f"teacher {teacher.name!r} is CFG over {spec.base!r}: the full teachers config is needed")
        # The base field is built in this replica (no extra network hop per query); it runs on this
        # replica's device with this replica's settings.
        base_cfg = all_teachers.teacher(spec.base).model_copy(update={"device": teacher.device, "dtype": teacher.dtype})
        return CFGField(build_field(base_cfg, all_teachers), spec.alpha, name=teacher.name)
    raise TypeError(f"unknown field spec {type(spec).__name__}")


def _store(spec) -> TextEmbeddings | None:
    return TextEmbeddings("precompute", spec.text_embeddings) if spec.text_embeddings else None


def _served_copy(field, name: str, requires_source: bool):
    import copy
    from dataclasses import replace

    served = copy.copy(field)  # shallow: shares the reference sets, own FieldInfo
    served.info = replace(field.info, name=name, requires_source=requires_source)
    return served
