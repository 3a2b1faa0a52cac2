"""The verdicts: for each claim of each paper the study can judge, "held", "did not hold" or
"inconclusive", with the numbers that decide it, from the summaries alone.

How a verdict is decided: a comparison of means over seeds is "held" or
"did not hold" when the difference is larger than the seeds' standard
deviation (the larger of the two sides'), "inconclusive" when it is not; a
claim about reaching the target is "held" when every seed reaches it,
"did not hold" when none does, "inconclusive" in between; a claim over
several batch sizes holds when it holds at every batch where it can be
judged, and did not hold when it failed at any.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .study_view import ADASCALE_BASELINE, Study, mean, mean_sd, sd

HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"


@dataclass
class Verdict:
    paper: str
    claim: str
    model: str
    status: str  # HELD, NOT_HELD or INCONCLUSIVE
    numbers: str
    methods: tuple[str, ...] = ()  # the methods it compares (a caveat on their family's tuning applies)

    def line(self) -> str:
        return f"- **{self.status}**: {self.paper}, {self.model}: {self.claim}. {self.numbers}"


def compare(mine: list[float], theirs: list[float], higher_is_better: bool = True) -> str:
    """HELD when ``mine`` is better than ``theirs`` by more than the larger of their standard deviations,
    NOT_HELD when worse by more, INCONCLUSIVE within the spread (or with no values)."""
    if not mine or not theirs:
        return INCONCLUSIVE
    diff = mean(mine) - mean(theirs)
    if not higher_is_better:
        diff = -diff
    if abs(diff) <= max(sd(mine), sd(theirs)):
        return INCONCLUSIVE
    return HELD if diff > 0 else NOT_HELD


def combine(statuses: list[str]) -> str:
    """A claim over several batch sizes: NOT_HELD if it failed at any, HELD if it held at every judged one."""
    if NOT_HELD in statuses:
        return NOT_HELD
    if statuses and all(s == HELD for s in statuses):
        return HELD
    return INCONCLUSIVE


def reach_status(reached: int, seeds: int) -> str:
    if seeds == 0:
        return INCONCLUSIVE
    return HELD if reached == seeds else NOT_HELD if reached == 0 else INCONCLUSIVE


def verdicts(study: Study) -> list[Verdict]:
    """Every claim of every paper this study can judge, per model, from the summaries alone."""
    out: list[Verdict] = []
    for model in study.models:
        if not study.targets(model):
            continue
        for v in (reaches_everywhere(study, model, "lena", "LENA paper"),
                  *fewer_iterations(study, model),
                  *never_at_largest(study, model),
                  lena_throughput(study, model),
                  state_aware_most_at_largest(study, model),
                  *clars_claims(study, model),
                  reaches_everywhere(study, model, "adascale", "AdaScale paper")):
            if v is not None:
                caveat = study.caveats(model, v.methods)
                if caveat and v.status != INCONCLUSIVE:
                    v.numbers += f" Caveat: {caveat}."
                out.append(v)
    return out


def reaches_everywhere(study: Study, model: str, method: str, paper: str) -> Verdict | None:
    large = [b for b in study.large(model) if study.runs(model, method=method, batch=b)]
    if not large:
        return None
    parts, statuses = [], []
    for b in large:
        pairs = study.reached(model, method, b)
        k = sum(1 for _, h in pairs if h)
        statuses.append(reach_status(k, len(pairs)))
        parts.append(f"B = {b}: {k}/{len(pairs)} seeds")
    missing = [b for b in study.large(model) if b not in large]
    status = NOT_HELD if NOT_HELD in statuses else HELD if all(s == HELD for s in statuses) else INCONCLUSIVE
    if missing and status == HELD:
        status = INCONCLUSIVE
    extra = f"; not run yet at B = {', '.join(map(str, missing))}" if missing else ""
    if method == "adascale":
        stops = [r for b in large for r in study.records_of(model, method=method, batch=b) if r.get("stopped")]
        capped = sum(r["stopped"] == "cap" for r in stops)
        extra += f"; {capped} of {len(stops)} runs stopped at the cap before tau reached T1" if stops else ""
    return Verdict(paper, f"{method} reaches the base batch's test accuracy at every batch size", model, status,
                   "Reached by " + ", ".join(parts) + extra + ".", (method,))


def fewer_iterations(study: Study, model: str) -> list[Verdict]:
    out = []
    for rival in (ADASCALE_BASELINE, "lsw"):
        if rival not in study.spec["methods"] or "lena" not in study.spec["methods"]:
            continue
        parts, statuses, ran = [], [], False
        for b in study.large(model):
            mine, theirs = study.reached(model, "lena", b), study.reached(model, rival, b)
            if not mine or not theirs:
                parts.append(f"B = {b}: not run yet")
                statuses.append(INCONCLUSIVE)
                continue
            ran = True
            a = [h["step"] for _, h in mine if h]
            c = [h["step"] for _, h in theirs if h]
            if not a and not c:  # not judged here, so the claim "at every large batch" cannot hold
                parts.append(f"B = {b}: neither reaches the target")
                statuses.append(INCONCLUSIVE)
                continue
            if len(a) == len(mine) and not c:
                status = HELD
            elif not a and c:
                status = NOT_HELD
            elif len(a) == len(mine) and len(c) == len(theirs):
                status = compare(a, c, higher_is_better=False)
            else:
                status = INCONCLUSIVE
            statuses.append(status)
            fa = f"{mean(a):.0f}" + ("" if len(a) == len(mine) else f" ({len(a)}/{len(mine)} seeds)") if a \
                else "never"
            fc = f"{mean(c):.0f}" + ("" if len(c) == len(theirs) else f" ({len(c)}/{len(theirs)} seeds)") if c \
                else "never"
            parts.append(f"B = {b}: {fa} vs {fc} ({status})")
        if not ran:
            continue
        out.append(Verdict("LENA paper", f"LENA needs fewer iterations to target than {rival} at every large "
                           "batch", model, combine(statuses),
                           "Iterations to target, LENA vs " + rival + ": " + "; ".join(parts) + ".",
                           ("lena", rival)))
    return out


def never_at_largest(study: Study, model: str) -> list[Verdict]:
    out = []
    top = max(study.batches(model))
    if top <= study.spec["base_batch"]:
        return out
    for rival in ("lsw", ADASCALE_BASELINE):
        pairs = study.reached(model, rival, top)
        if not pairs:
            continue
        k = sum(1 for _, h in pairs if h)
        status = HELD if k == 0 else NOT_HELD if k == len(pairs) else INCONCLUSIVE
        out.append(Verdict("LENA paper", f"{rival} never reaches the target at the largest batch (B = {top})",
                           model, status, f"Reached by {k}/{len(pairs)} seeds; final test accuracy "
                           f"{mean_sd([100 * r.final_test_accuracy for r, _ in pairs])}%.", (rival,)))
    return out


def lena_throughput(study: Study, model: str) -> Verdict | None:
    per = study.per_update(model)
    ratios = [mean(per[("lena", b)]) / mean(per[("lsw", b)]) for b in study.large(model)
              if per.get(("lena", b)) and per.get(("lsw", b))]
    if not ratios:
        return None
    slowdown = mean(ratios) - 1
    disturbed, same = study.timing_disturbed(model)
    clock = "CPU" if study.clock()[0] == "cpu" else "wall"
    if disturbed:
        status, why = INCONCLUSIVE, (f"; the machine's load moved the times (sgd / lsw, the same work: "
                                     f"{min(same):.2f}-{max(same):.2f})")
    else:
        status, why = (HELD if slowdown <= 0.075 else NOT_HELD), " (held: at most 7.5% slower)"
    return Verdict("LENA paper", "LENA's time per update is about 5% above fixed scaling's (LSW)", model, status,
                   f"Measured {100 * slowdown:+.1f}% ({clock} time per update, mean over the large batches){why}.")


def state_aware_most_at_largest(study: Study, model: str) -> Verdict | None:
    gains = study.ablation_gains(model)
    batches = study.ablation_batches(model)
    if not gains or len(batches) < 2:
        return None
    top, second = batches[-1], batches[-2]
    parts, statuses = [], []
    for method, g in gains.items():
        if top not in g:
            continue
        noise = sd([r.final_test_accuracy for r in study.runs(model, method=method, batch=top)])
        if g[top] > noise and g[top] > g.get(second, -math.inf):
            status = HELD
        elif g[top] < -noise or (second in g and g[top] < g[second] - noise):
            status = NOT_HELD
        else:
            status = INCONCLUSIVE
        statuses.append(status)
        parts.append(f"{method} {100 * g[top]:+.2f} at {top}" + (f" vs {100 * g[second]:+.2f} at {second}"
                                                                 if second in g else "") + f" ({status})")
    if not parts:
        return None
    return Verdict("LENA paper, Table 2", "the state-aware warm-up helps every method, most at the largest batch",
                   model, combine(statuses),
                   "Final accuracy with the state-aware warm-up minus the better of none and fixed, in points "
                   "(noise: the seeds' standard deviation in the main sweep): " + "; ".join(parts) + ".",
                   tuple(gains))


def _per_batch(study: Study, model: str, values: Callable[[str, int], list[float]], rival: str
               ) -> tuple[list[str], list[str]]:
    """CLARS against ``rival`` at each large batch where both ran: the texts and the statuses."""
    parts, statuses = [], []
    for b in study.large(model):
        mine, theirs = values("clars", b), values(rival, b)
        if not mine or not theirs:
            continue
        status = compare(mine, theirs)
        statuses.append(status)
        parts.append(f"B = {b}: {100 * mean(mine):.2f}% vs {100 * mean(theirs):.2f}% ({status})")
    return parts, statuses


def clars_claims(study: Study, model: str) -> list[Verdict]:
    """CLARS's claims against gradual warm-up and against LARS (which adapts every tensor, as CLARS does)."""
    if "clars" not in study.spec["methods"]:
        return []
    out = []

    def after_one_epoch(method: str, b: int) -> list[float]:
        return study.early(model, method, b, 1)

    def final(method: str, b: int) -> list[float]:
        return [r.final_test_accuracy for r in study.runs(model, method=method, batch=b)]

    for rival, what in (("lsw", "momentum SGD with gradual warm-up"), ("lars", "LARS with gradual warm-up")):
        parts, statuses = _per_batch(study, model, after_one_epoch, rival)
        if parts:
            out.append(Verdict("CLARS paper", f"CLARS without warm-up is ahead of {what} after the first epoch",
                               model, combine(statuses), "Test accuracy after epoch 1: " + "; ".join(parts) + ".",
                               ("clars", rival)))
    parts, statuses = _per_batch(study, model, final, "lars")
    if parts:
        out.append(Verdict("CLARS paper", "CLARS ends more accurate than LARS with gradual warm-up", model,
                           combine(statuses), "Final test accuracy: " + "; ".join(parts) + ".", ("clars", "lars")))
    return out
