"""The capability suite: exact teachers, judges that can fail, diversity, buckets, both tiers."""

import pytest
import torch

from danceopd.evaluation import sample
from danceopd.fields.base import Conditions
from danceopd.fields.operators import SoftMixField
from danceopd.suite import world
from danceopd.suite.judges import diversity, realism_reward


@pytest.mark.parametrize("suite_name,n", [("basic_suite", 96), ("hard_suite", 48)])
@pytest.mark.parametrize("capability", ["t2i", "local_edit", "global_edit", "realism", "uncond"])
def test_exact_teachers_score_at_least_095(request, suite_name, n, capability):
    suite = request.getfixturevalue(suite_name)
    cond = suite.bucket(capability).evaluation_set(n)
    samples = sample(suite.field(capability), cond, steps=16, seed=3)
    result = suite.judge(capability, samples, cond)
    assert result["score"] >= 0.95, result


def test_t2i_teacher_covers_its_reference_set(basic_suite):
    cond = Conditions([p for p in basic_suite.bucket("t2i").prompts for _ in range(16)])
    samples = sample(basic_suite.field("t2i"), cond, steps=16, seed=0)
    d = diversity(samples, cond.prompts, basic_suite.field("t2i").references)
    assert d["matched_fraction"] == 1.0
    assert d["modes_hit"] >= 150  # 192 draws over 12 x 64 references: ~170 distinct expected


def test_diversity_exposes_a_collapsed_sampler(basic_suite):
    """Accuracy 1.0 with one image per prompt must show as 12 modes, not as success."""
    t2i = basic_suite.field("t2i")
    cond = Conditions([p for p in basic_suite.bucket("t2i").prompts for _ in range(16)])
    collapsed = torch.stack([t2i.references(p)[0] for p in cond.prompts])
    assert basic_suite.judge("t2i", collapsed, cond)["score"] == 1.0
    assert diversity(collapsed, cond.prompts, t2i.references)["modes_hit"] == 12


def test_t2i_judge_rejects_wrong_colour_shape_and_relation(basic_suite, hard_suite):
    t = basic_suite.tier
    red_circle = world.render(world.Scene((world.SceneObject("red", "circle", 8, 8, 5),)), t.size)
    blue_square = world.render(world.Scene((world.SceneObject("blue", "square", 8, 8, 4),)), t.size)
    red_triangle = world.render(world.Scene((world.SceneObject("red", "triangle", 8, 8, 5),)), t.size)
    cond = Conditions(["a red circle"] * 3)
    r = basic_suite.judge("t2i", torch.stack([red_circle, blue_square, red_triangle]), cond)
    assert r["score"] == pytest.approx(1 / 3)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert basic_suite.judge("t2i", noise, Conditions(["a red circle"] * 4))["score"] == 0.0
    h = hard_suite.tier
    a, b = world.SceneObject("red", "circle", 8, 16, 5), world.SceneObject("blue", "square", 24, 16, 5)
    img = world.render(world.Scene((a, b), "left of"), h.size)
    ok = hard_suite.judge("t2i", img[None], Conditions(["a red circle left of a blue square"]))["score"]
    swapped = hard_suite.judge("t2i", img[None], Conditions(["a blue square left of a red circle"]))["score"]
    assert (ok, swapped) == (1.0, 0.0)


def test_edit_judges_fail_an_unedited_image(basic_suite):
    for cap in ("local_edit", "global_edit"):
        cond = basic_suite.bucket(cap).evaluation_set(16)
        r = basic_suite.judge(cap, cond.source.clone(), cond)
        assert r["score"] == 0.0, (cap, r)


def test_local_edit_judge_fails_when_background_changes(basic_suite):
    cond = basic_suite.bucket("local_edit").evaluation_set(8)
    target = basic_suite.field("local_edit").targets(cond)
    assert basic_suite.judge("local_edit", target, cond)["score"] == 1.0
    night = world.apply_global_edit(target, "night")
    assert basic_suite.judge("local_edit", night, cond)["score"] == 0.0


def test_realism_reward_separates_flat_and_realistic(basic_suite):
    t = basic_suite.tier
    scene = world.Scene((world.SceneObject("green", "square", 8, 8, 5),))
    assert realism_reward(world.render(scene, t.size), t) < 0.05
    assert realism_reward(world.render(scene, t.size, realistic=True), t) > 0.95


def test_global_edit_psnr_is_continuous(basic_suite):
    cond = basic_suite.bucket("global_edit").evaluation_set(8)
    target = torch.stack([world.apply_global_edit(s, e) for s, e in zip(cond.source, cond.prompts)])
    noisy = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    r = basic_suite.judge("global_edit", noisy, cond)
    assert 25.0 < r["psnr_db"] < 27.0  # RMSE 0.1 on a peak-to-peak of 2 is 26 dB


def test_buckets_are_pure_functions_of_the_seed(basic_suite):
    b = basic_suite.bucket("local_edit")
    c1, c2, c3 = b.sample(8, 42), b.sample(8, 42), b.sample(8, 43)
    assert c1.prompts == c2.prompts and torch.equal(c1.source, c2.source)
    assert c1.prompts != c3.prompts or not torch.equal(c1.source, c3.source)
    for src, instr in zip(c1.source, c1.prompts):
        shape, colour = world.parse_local_edit(instr)
        assert shape in basic_suite.tier.shapes and colour in basic_suite.tier.colours
        assert not torch.equal(basic_suite.field("local_edit").targets(Conditions([instr], src[None]))[0], src)


def test_smoothed_teacher_is_exact_but_less_sharp():
    from danceopd.suite import CapabilitySuite

    smooth = CapabilitySuite("basic", tau=0.05)
    cond = smooth.bucket("t2i").evaluation_set(48)
    samples = sample(smooth.field("t2i"), cond, steps=16, seed=0)
    d = diversity(samples, cond.prompts, smooth.field("t2i").references)
    assert 0.015 < d["mean_nearest_rmse"] < 0.08  # near one reference, not on it (tau = 0 lands exactly: 0.0)
    assert smooth.judge("t2i", samples, cond)["score"] >= 0.95


def test_soft_mix_of_all_fields_is_defined_on_any_bucket(basic_suite):
    fields = [basic_suite.field(c) for c in ("t2i", "local_edit", "global_edit")]
    mix = SoftMixField(fields, [1, 1, 2])
    for cap in ("t2i", "local_edit", "global_edit"):
        cond = basic_suite.bucket(cap).sample(4, 0)
        x, s = torch.randn(4, 3, 16, 16), torch.full((4,), 0.5)
        v = mix.velocity(x, s, cond)
        expected = sum(w * f.velocity(x, s, cond) for f, w in zip(fields, [0.25, 0.25, 0.5]))
        torch.testing.assert_close(v, expected)


def test_unknown_prompt_and_capability_are_rejected(basic_suite):
    with pytest.raises(ValueError, match="capability"):
        basic_suite.field("inpainting")
    with pytest.raises(ValueError, match="x must be"):
        basic_suite.field("t2i").velocity(torch.zeros(1, 3, 8, 8), torch.ones(1), Conditions(["a red circle"]))


def test_hard_tier_has_compositional_prompts_and_more_edits(hard_suite):
    prompts = hard_suite.bucket("t2i").prompts
    assert len(prompts) > 500 and "a red circle left of a blue square" in prompts
    assert set(hard_suite.tier.global_edits) >= {"invert", "night", "mirror", "rotate"}
    assert hard_suite.tier.size == 32
