"""The router hook of the agent loop: per step, pick the precision that produces the next action.

A router is any object with

    decide(contexts: list[StepContext]) -> list[str]

one precision per context, at most one context per episode in a call. `precisions[0]` is the
high-precision reference (bf16); the others are lower precisions. The agent loop (dmr.agent) also
reads, where a router has them:
- `last_scores`: after `decide`, one score per context (None where the router did not decide the
  step), recorded as the step's `route_score`;
- `last_probs`: after `decide`, a router over more than two precisions gives its whole distribution
  per context (None where it did not decide), recorded as `route_probs` for dmr.calibrate's cost
  budget; a two-precision router leaves it None and its runs have no such column;
- `generations`: {(episode, step): Generation} of steps the router already decoded (the KL
  oracle's bf16 proposal), used instead of decoding them again;
- `last_kl`: after `decide`, the step KL measured but not acted on, recorded as `true_kl`;
- `end_session(episode)`: called when an episode ends;
- `p`, `threshold`, `tau`: the effective routing parameters, recorded in the run's spec.

The policies of a run are in dmr.policies; the learned router is dmr.router.Router.

The precision ladder (`needs_more`, `ladder`) turns a distribution over precisions into one: the
precisions are ordered by cost, bf16 first, and class j of a KL-ST router means "precisions[j] is the
cheapest that suffices" (dmr.labels.precision_labels). h_j, the probability of the classes before j,
is the router's belief that precisions[j] does not suffice; a step goes to the cheapest j whose h_j
stays below its threshold, else to bf16. With two precisions h_1 is p_bf16 and the rule is the
paper's: bf16 iff p_bf16 >= threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dmr.prompts import Episode, constraint


@dataclass
class StepContext:
    """What a router may look at when it decides one step."""

    episode: str
    step: int
    goal: str
    history: list[tuple[str, str]]  # earlier (action, observation) pairs
    observation: str
    admissible: list[str]
    step_type: str = "action"
    first: str = ""  # the initial observation of the episode
    info: dict = field(default_factory=dict)


def step_text(step: int, goal: str, prev_action: str, observation: str) -> str:
    """What the router sees of one step: the previous action and the observation it produced; the
    first step, having no previous action, shows the task instead."""
    if step == 0:
        return f"{goal.strip()}\n{observation.strip()}"
    return f"> {prev_action.strip()}\n{observation.strip()}"


def propose(backend, style, sampling, contexts: list[StepContext], constrained: bool):
    """One precision's proposal at each step, decoded as the agent decodes (its prompt, its sessions,
    its constraint): (prompts, session keys, generations)."""
    views = [Episode(c.goal, c.first, c.history, c.admissible) for c in contexts]
    keys = [c.episode for c in contexts]
    texts = [style.render(backend.tokenizer, v) for v in views]
    allowed = [constraint(style, c.admissible) for c in contexts] if constrained else None
    return texts, keys, backend.generate(texts, sampling, allowed, sessions=keys)


def replay_contexts(steps, episodes):
    """StepContexts of recorded episodes, per episode in step order (what the agent showed the router)."""
    goals = dict(zip(episodes["task"], episodes["goal"]))
    out = []
    for (task,), df in steps.sort("task", "step").group_by("task", maintain_order=True):
        rows = df.to_dicts()
        ctx = []
        for i, r in enumerate(rows):
            history = [(rows[j + 1]["prev_action"], rows[j + 1]["observation"]) for j in range(i)]
            ctx.append(StepContext(task, i, goals[task], history, r["observation"], r.get("admissible") or [],
                                   step_type=r["step_type"], first=rows[0]["observation"]))
        out.append(ctx)
    return out


def needs_more(probs) -> list[float]:
    """h_1..h_{C-1} of a distribution over C precisions (bf16 first, then by falling cost): h_j, the
    summed probability of classes 0..j-1, is the belief that precisions[j] does not suffice. It never
    falls with j (a sum of non-negative terms in order, also in floating point); h_1 = p_bf16 exactly."""
    out, acc = [], 0.0
    for q in list(probs)[:-1]:
        acc += q
        out.append(acc)
    return out


def ladder(probs, threshold) -> int:
    """The class (precision index) a step goes to: the cheapest j >= 1 with h_j < threshold_j, else 0
    (bf16). `threshold`: one number for every rung, or one per low precision (C - 1 of them). With
    one number t the choice only gets cheaper as t grows: one knob per budget (dmr.calibrate)."""
    h = needs_more(probs)
    t = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold] * len(h)
    if len(t) != len(h):
        raise ValueError(f"{len(t)} thresholds for {len(h)} low precisions: give one, or one per low precision")
    for j in range(len(h), 0, -1):
        if h[j - 1] < t[j - 1]:
            return j
    return 0
