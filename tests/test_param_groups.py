import pytest
import torch
from torch import nn

from largebatch.param_groups import NORM_LAYERS, Rule, param_groups, plan_param_groups


class Net(nn.Module):
    """conv (no bias) -> BatchNorm -> linear, plus a LayerNorm, a GroupNorm and a 3-d tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.gn = nn.GroupNorm(1, 4)
        self.pos = nn.Parameter(torch.zeros(1, 2, 3))


# named_parameters() order: the root's own tensors first.
ALL = ["pos", "conv.weight", "bn.weight", "bn.bias", "fc.weight", "fc.bias", "ln.weight", "ln.bias",
       "gn.weight", "gn.bias"]
VECTORS = ["bn.weight", "bn.bias", "fc.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias"]


def layout(groups):
    """{(weight_decay, adapt): [names]} for easy comparison."""
    return {(g["weight_decay"], g["adapt"]): g["param_names"] for g in groups}


def excluded(model, **kwargs):
    plan = plan_param_groups(model, weight_decay=0.1, **kwargs)
    d = plan.as_dict()
    return d["no_decay"], d["no_adapt"]


def test_defaults_exclude_vectors_from_decay_adapt_everything_and_keep_model_order():
    groups = param_groups(Net(), weight_decay=0.1)
    assert layout(groups) == {(0.1, True): ["pos", "conv.weight", "fc.weight"], (0.0, True): VECTORS}
    for g in groups:  # model order within each group
        assert g["param_names"] == sorted(g["param_names"], key=ALL.index)
    for g in groups:
        assert set(g) == {"params", "param_names", "weight_decay", "adapt"}


def test_param_names_match_tensors_and_named_parameters():
    model = Net()
    assert [n for n, _ in model.named_parameters()] == ALL
    named = dict(model.named_parameters())
    for g in param_groups(model, weight_decay=0.1):
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"], strict=True))


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("ndim<=1", VECTORS),
        ("ndim < 2", VECTORS),
        ("ndim==3", ["pos"]),
        ("ndim>=2", ["pos", "conv.weight", "fc.weight"]),
        ("bias", ["bn.bias", "fc.bias", "ln.bias", "gn.bias"]),
        ("norm", ["bn.weight", "bn.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias"]),
        ("glob:*.bias", ["bn.bias", "fc.bias", "ln.bias", "gn.bias"]),
        ("glob:?n.*", ["bn.weight", "bn.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias"]),
        ("re:^fc\\.", ["fc.weight", "fc.bias"]),
        ("re:weight$", ["conv.weight", "bn.weight", "fc.weight", "ln.weight", "gn.weight"]),
        (nn.BatchNorm2d, ["bn.weight", "bn.bias"]),
        ((nn.LayerNorm, nn.GroupNorm), ["ln.weight", "ln.bias", "gn.weight", "gn.bias"]),
        (NORM_LAYERS, ["bn.weight", "bn.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias"]),
        (lambda name, p, m: p.numel() == 3, ["fc.bias", "ln.weight", "ln.bias"]),
        (Rule("conv", lambda name, p, m: isinstance(m, nn.Conv2d)), ["conv.weight"]),
        (["glob:pos", nn.Linear], ["pos", "fc.weight", "fc.bias"]),
        (None, []),
        ([], []),
    ],
)
def test_each_rule_kind(rule, expected):
    no_decay, no_adapt = excluded(Net(), no_decay=rule, no_adapt=None)
    assert no_decay == expected
    assert no_adapt == []


def test_masks_are_independent():
    groups = param_groups(Net(), weight_decay=0.1, no_decay="bias", no_adapt=["norm", "glob:pos"])
    assert layout(groups) == {
        (0.1, True): ["conv.weight", "fc.weight"],
        (0.1, False): ["pos", "bn.weight", "ln.weight", "gn.weight"],
        (0.0, True): ["fc.bias"],
        (0.0, False): ["bn.bias", "ln.bias", "gn.bias"],
    }


def test_group_defaults_pass_through_and_optimizer_accepts_groups():
    model = Net()
    groups = param_groups(model, weight_decay=0.1, no_adapt="ndim<=1", lr=0.5, momentum=0.8)
    assert all(g["lr"] == 0.5 and g["momentum"] == 0.8 for g in groups)
    opt = torch.optim.SGD(groups, lr=0.1)
    saved = opt.state_dict()["param_groups"]
    assert [g["param_names"] for g in saved] == [g["param_names"] for g in groups]
    assert [g["adapt"] for g in saved] == [True, False]
    # Names in every group, as torch requires; unnamed groups on request.
    assert all("param_names" not in g for g in param_groups(model, weight_decay=0.1, names=False))


@pytest.mark.parametrize("key", ["params", "param_names", "adapt"])
def test_reserved_group_keys_rejected(key):
    with pytest.raises(ValueError, match=key):
        param_groups(Net(), weight_decay=0.1, **{key: 1})


def test_report_lists_what_each_rule_caught():
    plan = plan_param_groups(Net(), weight_decay=0.1, no_decay=["bias", "glob:pos"], no_adapt="norm")
    assert plan.caught() == {
        "no_decay": {"bias": ["bn.bias", "fc.bias", "ln.bias", "gn.bias"], "glob:pos": ["pos"]},
        "no_adapt": {"norm": ["bn.weight", "bn.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias"]},
    }
    text = plan.report()
    assert "4 param groups from 10 trainable tensors" in text
    assert "glob:pos: 1 tensors (pos)" in text
    assert "bias: 4 tensors (bn.bias, fc.bias, ln.bias, gn.bias)" in text
    assert "norm: 6 tensors (bn.weight, bn.bias, ln.weight, ln.bias, gn.weight, gn.bias)\n" in text
    long = plan_param_groups(nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)]), weight_decay=0.1)
    assert "ndim<=1: 8 tensors (0.bias, 1.bias, 2.bias, 3.bias, 4.bias, 5.bias, ... (+2 more))" in long.report()
    assert str(plan) == text
    d = plan.as_dict()
    assert sum(g["numel"] for g in d["groups"]) == sum(p.numel() for p in Net().parameters())
    by_name = {i.name: i for i in plan.params}
    assert by_name["gn.bias"].no_decay_by == ("bias",) and by_name["gn.bias"].no_adapt_by == ("norm",)
    assert by_name["pos"].module_type == "Net"


def test_same_description_twice_is_kept_apart():
    two_lambdas = [lambda n, p, m: n == "pos", lambda n, p, m: False]
    plan = plan_param_groups(Net(), weight_decay=0.1, no_decay=two_lambdas)
    assert list(plan.caught()["no_decay"].values()) == [["pos"], []]
    with pytest.raises(ValueError, match="#2"):
        plan_param_groups(Net(), weight_decay=0.1, strict=True, no_adapt=None, no_decay=two_lambdas)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)
        self.head.weight = self.emb.weight


def test_tied_parameter_placed_once_under_its_first_name():
    model = TiedLM()
    plan = plan_param_groups(model, weight_decay=0.1)
    groups = plan.groups()
    tensors = [p for g in groups for p in g["params"]]
    assert len(tensors) == len({id(p) for p in tensors}) == len(list(model.parameters())) == 4
    assert layout(groups)[(0.1, True)] == ["emb.weight"]
    assert plan.as_dict()["tied"] == {"emb.weight": ["head.weight"]}
    assert "tied: emb.weight is also head.weight" in plan.report()
    torch.optim.SGD(groups, lr=0.1)  # no duplicate-parameter error


def test_rule_matches_tied_parameter_through_any_name():
    for rule in ("glob:head.*", nn.Linear):
        no_decay, _ = excluded(TiedLM(), no_decay=rule)
        assert no_decay == ["emb.weight", "head.bias"]


def test_shared_module_params_counted_once():
    block = nn.Linear(3, 3)
    model = nn.Sequential(block, nn.ReLU(), block)
    groups = param_groups(model, weight_decay=0.1)
    assert layout(groups) == {(0.1, True): ["0.weight"], (0.0, True): ["0.bias"]}


def test_frozen_parameters_skipped_and_reported():
    model = Net()
    model.conv.requires_grad_(False)
    model.bn.bias.requires_grad_(False)
    plan = plan_param_groups(model, weight_decay=0.1)
    names = [n for g in plan.groups() for n in g["param_names"]]
    assert "conv.weight" not in names and "bn.bias" not in names and len(names) == 8
    assert plan.frozen == ("conv.weight", "bn.bias")
    assert "frozen (requires_grad=False, skipped): conv.weight, bn.bias" in plan.report()


def test_fully_frozen_model_gives_no_groups():
    model = nn.Linear(2, 2).requires_grad_(False)
    assert param_groups(model, weight_decay=0.1) == []


def test_at_most_four_groups_and_empty_ones_dropped():
    model = nn.Linear(2, 2, bias=False)
    assert len(param_groups(model, weight_decay=0.1)) == 1
    assert len(param_groups(Net(), weight_decay=0.1, no_decay="bias", no_adapt="norm")) == 4


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"no_decay": "biases"}, "no_decay"),
        ({"no_adapt": "ndim<=x"}, "no_adapt"),
        ({"no_adapt": "*.bias"}, "no_adapt"),  # patterns need glob: or re:
        ({"no_decay": "re:("}, "no_decay"),
        ({"no_decay": int}, "no_decay"),
        ({"no_decay": 3}, "no_decay"),
        ({"no_decay": ["bias", "oops"]}, "no_decay"),
    ],
)
def test_bad_rules_raise_value_error_naming_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        param_groups(Net(), weight_decay=0.1, **kwargs)


@pytest.mark.parametrize("weight_decay", [-1.0, float("nan"), float("inf"), "0.1", True, None])
def test_bad_weight_decay(weight_decay):
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(Net(), weight_decay=weight_decay)


def test_strict_rejects_rule_matching_nothing():
    with pytest.raises(ValueError, match=r"no_adapt: rule 'glob:\*\.bais' matches no parameter"):
        param_groups(Net(), weight_decay=0.1, no_adapt=["ndim<=1", "glob:*.bais"], strict=True)
    with pytest.raises(ValueError, match="no_decay"):
        param_groups(nn.Linear(2, 2, bias=False), weight_decay=0.1, strict=True)
    # Lenient by default; a rule that only catches frozen tensors is not a typo.
    param_groups(Net(), weight_decay=0.1, no_adapt="glob:*.bais")
    model = Net()
    model.fc.requires_grad_(False)
    param_groups(model, weight_decay=0.1, no_decay="glob:fc.*", strict=True)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        param_groups([torch.zeros(2)], weight_decay=0.1)


def test_no_adapt_lr_sets_the_rate_of_the_groups_not_adapted_only():
    groups = param_groups(Net(), weight_decay=0.1, no_adapt="ndim<=1", no_adapt_lr=0.03)
    assert {(g["weight_decay"], g["adapt"]): g.get("lr") for g in groups} == {(0.1, True): None, (0.0, False): 0.03}
    with pytest.raises(ValueError, match="no_adapt_lr"):
        param_groups(Net(), weight_decay=0.1, no_adapt_lr=0.03, lr=1.0)
    for bad in (-1.0, float("nan"), "0.1", torch.ones(2)):
        with pytest.raises(ValueError, match="no_adapt_lr"):
            param_groups(Net(), weight_decay=0.1, no_adapt="ndim<=1", no_adapt_lr=bad)


def test_lars_on_the_default_groups_trains_where_the_old_mask_diverged():
    """The README's LARS block (rate 80, learnable data, 5 epochs): the old default mask sent the
    biases to plain SGD steps at 80 and the loss rose; every tensor adapted, or the mask with an
    SGD-scale rate of its own, lowers it."""
    from largebatch import LARS, linear_scaling

    def final_loss(**masks):
        torch.manual_seed(0)
        images = torch.randn(1024, 64)
        labels = (images @ torch.randn(64, 10)).argmax(1)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = LARS(param_groups(model, weight_decay=5e-4, **masks), lr=linear_scaling(10.0, 128, 1024), momentum=0.9)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses[0], losses[-1]

    first, last = final_loss()
    assert last < 0.5 * first
    first, last = final_loss(no_adapt="ndim<=1", no_adapt_lr=linear_scaling(10.0, 128, 1024) * 1e-3)
    assert last < 0.5 * first
    first, last = final_loss(no_adapt="ndim<=1")
    assert not last < first  # the old default: plain steps at 80 on the biases
