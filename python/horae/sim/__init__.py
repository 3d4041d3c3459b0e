"""Scheduling studies without a GPU: the real scheduler and block manager on request traces.

>>> from horae import sim
>>> trace = sim.bundled_trace()
>>> report = sim.sweep(trace, rate_scales=[0.5, 1.0], sla={"ttft": 10.0, "max_itl": 1.5})
>>> report.goodput_table()          # {rate_scale: {scheduler: goodput tok/s}}
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from horae import _core
from horae._core import HoraeCoreError, Trace
from horae.checks import is_number, optional_positive_int, unsigned_ints
from horae.priors import Prior, check_lengths, resolve_prior

#: Baselines that are a policy with one setting changed: "aggressive-99" admits until 99% of the
#: pool's blocks are used (LightLLM's "agg99", and vLLM's rule: keep 1% of blocks free, preempt
#: the newest by recompute); plain "aggressive" stops at 95% (LightLLM's default).
VARIANTS: Dict[str, Tuple[str, Dict[str, object]]] = {"aggressive-99": ("aggressive", {"watermark": 0.99})}
POLICIES: Tuple[str, ...] = tuple(_core.SCHEDULERS)
SCHEDULERS: Tuple[str, ...] = POLICIES + tuple(VARIANTS)
MODEL_PRESETS: Tuple[str, ...] = tuple(_core.MODEL_PRESETS)
HARDWARE_PRESETS: Tuple[str, ...] = tuple(_core.HARDWARE_PRESETS)
SLA_KEYS = ("ttft", "tpot", "max_itl", "e2e")
ROUTERS: Tuple[str, ...] = tuple(_core.ROUTERS)
#: Where a request a replica shed goes next (`retry_shed=`; the first is the default).
RETRY_RULES: Tuple[str, ...] = tuple(_core.RETRY_RULES)
#: Queue disciplines (``queue=``): arrival order, or least slack first with hopeless requests shed.
QUEUES: Tuple[str, ...] = tuple(_core.QUEUES)
#: The Past-Future paper's SLA for a 7B model: first token within 10 s, no gap over 1.5 s.
PAPER_SLA = {"ttft": 10.0, "max_itl": 1.5}
BUNDLED = {"azure-conv-10min": "azure_conv_10min.csv"}

__all__ = [
    "Trace", "HoraeCoreError", "load_trace", "bundled_trace", "synthetic", "simulate", "sweep",
    "SimResult", "SweepReport", "fit_linear_cost", "SCHEDULERS", "ROUTERS", "RETRY_RULES", "QUEUES", "PAPER_SLA",
]


def load_trace(path: Union[str, os.PathLike], format: Optional[str] = None) -> Trace:
    """Load a trace file; the format (azure, mooncake, burstgpt, sharegpt, castillo, usage-json) is detected
    from its header unless given. Length-only formats come back untimed: use
    ``trace.with_arrivals(rate)`` or closed-loop ``clients``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"trace file not found: {p}")
    return _core.load_trace(str(p), format)


def bundled_trace(name: str = "azure-conv-10min") -> Trace:
    """A small real trace shipped with the package (see sim/data/SOURCES.md)."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled trace {name!r}; known: {', '.join(BUNDLED)}")
    return _core.load_trace(str(Path(__file__).parent / "data" / BUNDLED[name]), "azure")


def synthetic(dist: str, n: int, seed: int = 0) -> Trace:
    """The Past-Future paper's length sets: ``dist-1`` (in 32-4k, out 2k-4k), ``dist-2`` (in 3k-5k,
    out 3k-5k), ``dist-3`` (in 2k-4k, out 32-4k). Untimed."""
    return _core.synthetic_trace(dist, n, seed)


def _check_sla(sla: Optional[Mapping[str, float]]) -> Dict[str, float]:
    if sla is not None and not isinstance(sla, Mapping):
        raise TypeError(f"sla must be a dict of bounds in seconds, e.g. {{'ttft': 10, 'max_itl': 1.5}}, got {sla!r}")
    sla = dict(PAPER_SLA if sla is None else sla)
    unknown = set(sla) - set(SLA_KEYS)
    if unknown:
        raise ValueError(f"unknown SLA bound(s) {sorted(unknown)}; use {', '.join(SLA_KEYS)}")
    for k, v in sla.items():
        if not is_number(v) or not v > 0:
            raise ValueError(f"SLA bound {k} must be a positive number of seconds, got {v!r}")
    return sla


@dataclass
class SimResult:
    """One scheduler on one workload: summary figures plus per-request and per-step arrays."""

    policy: str
    summary: Dict[str, object]
    requests: Dict[str, np.ndarray]
    steps: Dict[str, np.ndarray]
    #: Past-Future's recorded output lengths at the end, oldest first (what a server stopping
    #: here saves; pass it as ``history=`` to start another run warm). None for other policies.
    history: Optional[np.ndarray] = None

    @property
    def goodput_tps(self) -> float:
        return float(self.summary["goodput_tps"])

    @property
    def window_goodput_tps(self) -> float:
        """Tokens of requests meeting the SLA per second of the arrivals' span. Between runs of one
        trace its ratio is that of the SLA-meeting tokens served; ``goodput_tps`` (per second of
        the whole run) also counts how soon the queue left at the last arrival drains. Past the
        knee this one keeps rising with the load (the drain's work counts over the arrivals'
        span alone), so compare it across runs of one load, not across loads."""
        return float(self.summary["window_goodput_tps"])

    @property
    def goodput_rps(self) -> float:
        return float(self.summary["goodput_rps"])


def simulate(
    trace: Trace,
    scheduler: str = "past-future",
    *,
    rate_scale: Optional[float] = None,
    clients: Optional[int] = None,
    sla: Optional[Mapping[str, float]] = None,
    history: Optional[Sequence[int]] = None,
    history_prior: Prior = None,
    **engine: object,
) -> SimResult:
    """Simulate one scheduler. Open loop replays the trace's arrivals (times ``rate_scale``);
    ``clients=N`` runs a closed loop instead. ``engine`` takes model, hardware, cost_coef,
    kv_cache_tokens, block_size, max_num_seqs, max_batched_tokens, max_tokens, prefix_caching,
    history_window, reserve, watermark, seed, speculative (a dict: k_max, adaptive, acceptance =
    the modelled proposer's mean acceptance rate, concentration of its per-request Beta), and the
    server's rules, the same for every policy: queue_timeout (seconds a request may wait before it
    starts; then it ends with "timeout", having cost nothing) and max_itl_abort (seconds a started
    request may go without a token; then "sla_abort"). `requests["finish_reason"]` says how each
    request ended; the summary counts `timeouts` and `sla_aborts` (requests that ended so). With
    ``retry_failed=True`` (closed loop) a client sends a request the rules failed again at once, as
    the paper's clients do: `requests["attempts"]`, `requests["timed_out"]` (its sends the deadline
    turned away) and `requests["wasted_tokens"]` (computed for failed attempts) say what that cost,
    times count from the last send, and the summary has `attempts_per_request`, `timed_out_sends`
    (every time-out answer, as `horae bench serve` counts them) and `wasted_tokens`.

    Past-Future's history: ``history`` (lengths an earlier run recorded, as
    ``SimResult.history``) starts it warm; ``history_prior`` (see ``horae.priors``) and
    ``history_prior_weight`` say what a cold history samples from until real lengths replace it.
    The forecast's studied alternatives: ``scenarios`` (a fixed count instead of 1 + 800/batch, at
    most 16), ``quantile`` (the q-quantile of the scenarios' peaks decides instead of the worst),
    ``redraw`` (LightLLM's fresh draws every step), ``fitted_tail`` (an exponential tail
    past the longest recorded length), ``bootstrap=False`` (one shared survival curve instead of a
    Bayesian-bootstrap curve per scenario while prior entries are left), ``linear_tail=False``
    (survivors past every finished length drawn up to ``max_tokens`` instead of to where the
    survival curve's slope ends) and ``max_admit_per_step`` (LightLLM admits one per round).
    Scheduler ``aggressive-99`` is aggressive at a 99% watermark (LightLLM's agg99, vLLM's rule).

    SLOs: ``sla`` is what each request is judged on and the server's default SLO;
    ``slo_classes=[{"ttft": 1, "max_itl": 0.2}, {"e2e": 300}]`` gives request i class i % len as its
    own bounds (what a class leaves out comes from ``sla``). ``queue="slo"`` (default "fcfs")
    orders waiting requests by slack against their bounds, sheds the hopeless ones ("timeout",
    nothing computed) and preempts where the least goodput is lost; ``preemption="newest"`` or
    ``"least-loss"`` overrides the last.

    A cluster: ``replicas=N`` (1 to 4,096) runs N simulated engines (open loop) behind ``router`` (one of
    ``ROUTERS``: "round-robin", "power-of-two", "prefix", "forecast", the default), which sees
    each replica's stats as published every ``staleness`` seconds (default 1). A request a replica
    sheds goes on by ``retry_shed`` (one of ``RETRY_RULES``, the Ray ingress's rule too): "always"
    (the default) to any replica that has not turned it away, while its first-token bound has not
    passed; "in-time" only to a replica with nothing waiting that can still prefill it within that
    bound; "never" nowhere. The summary adds
    ``router``, ``load_imbalance`` (the busiest replica's mean running count over the mean) and
    ``per_replica``; ``prefix_hit_rate`` is the cluster's."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a horae.sim.Trace, got {type(trace).__name__}")
    if rate_scale is not None and clients is not None:
        raise ValueError("give either rate_scale (open loop) or clients (closed loop), not both")
    sla = _check_sla(sla)
    if rate_scale is not None:
        trace = trace.scaled(float(rate_scale))
    if history is not None:
        history = check_lengths(history, "history")
    unsigned_ints({name: engine[name] for name in ("kv_cache_tokens", "block_size", "max_num_seqs", "max_batched_tokens",
                                                   "max_tokens", "history_window", "seed") if name in engine})
    for name in ("history_prior_weight", "long_prefill_token_threshold", "max_admit_per_step", "scenarios", "replicas",
                 "max_long_partial_prefills"):
        if name in engine:
            engine[name] = optional_positive_int(engine[name], name)
    # Switches, named in the error (the core's own message would not say which argument); numpy's
    # bool passes, as the core takes it.
    for name in ("prefix_caching", "retry_failed", "redraw", "fitted_tail", "bootstrap", "linear_tail"):
        if name in engine and not isinstance(engine[name], (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {engine[name]!r}")
    if engine.get("max_long_partial_prefills", 1) is None:
        del engine["max_long_partial_prefills"]  # None: the default
    if engine.get("censoring") is not None:
        engine["censoring"] = str(engine["censoring"])  # the core names the choices
    label = scheduler
    if scheduler in VARIANTS:
        scheduler, settings = VARIANTS[scheduler]
        engine = {**engine, **settings}
    summary, requests, steps, recorded = _core.simulate(
        trace, scheduler, clients=clients, history=history, history_prior=resolve_prior(history_prior), **sla, **engine
    )
    s = json.loads(summary)
    s["policy"] = label
    requests = {k: np.asarray(v) for k, v in requests.items()}  # finish_reason comes as a list of str
    recorded = None if recorded is None else np.asarray(recorded, dtype=np.int64)
    return SimResult(policy=s["policy"], summary=s, requests=requests, steps=dict(steps), history=recorded)


@dataclass
class SweepReport:
    """Results of every (load point, scheduler) pair of a sweep."""

    load: str  # "rate_scale" or "clients"
    points: List[float]
    schedulers: List[str]
    sla: Dict[str, float]
    results: Dict[Tuple[float, str], SimResult] = field(default_factory=dict)

    def goodput_table(self, metric: str = "tok/s") -> Dict[float, Dict[str, float]]:
        """``{load point: {scheduler: goodput}}``; metric ``tok/s`` (the paper's: prompt + output
        tokens of requests meeting the SLA per second) or ``req/s``."""
        key = {"tok/s": "goodput_tps", "req/s": "goodput_rps"}.get(metric)
        if key is None:
            raise ValueError("metric must be 'tok/s' or 'req/s'")
        return {p: {s: float(self.results[(p, s)].summary[key]) for s in self.schedulers} for p in self.points}

    def table(self, field_name: str) -> Dict[float, Dict[str, float]]:
        return {p: {s: self.results[(p, s)].summary[field_name] for s in self.schedulers} for p in self.points}

    def format(self) -> str:
        """The goodput tables as text, plus SLA attainment and preemptions; with the server's
        rules on, also time-outs, SLA aborts, sends per request and wasted tokens."""
        out = []
        blocks = [
            ("goodput (tok/s of requests meeting the SLA)", "goodput_tps", "{:>12.1f}"),
            ("goodput over the arrivals' span (tok/s; across one row, the SLA-meeting work served "
             "whatever the drain after the last arrival)", "window_goodput_tps", "{:>12.1f}"),
            ("goodput (req/s)", "goodput_rps", "{:>12.3f}"),
            ("SLA attainment", "sla_attainment", "{:>12.3f}"),
            ("preemptions", "preemptions", "{:>12d}"),
        ]
        summaries = [r.summary for r in self.results.values()]
        if any(x.get("timeouts") or x.get("sla_aborts") or x.get("attempts_per_request", 1) > 1 for x in summaries):
            blocks += [
                ("time-outs at the queue deadline (final attempts)", "timeouts", "{:>12d}"),
                ("time-outs at the queue deadline (every send)", "timed_out_sends", "{:>12d}"),
                ("SLA aborts (final attempts)", "sla_aborts", "{:>12d}"),
                ("sends per request (retries)", "attempts_per_request", "{:>12.2f}"),
                ("tokens wasted on failed attempts", "wasted_tokens", "{:>12d}"),
            ]
        sla = ", ".join(f"{k} <= {v:g}s" for k, v in self.sla.items())
        out.append(f"SLA: {sla}")
        for title, key, fmt in blocks:
            out.append(f"\n{title}")
            head = f"{self.load:>12}" + "".join(f"{s:>14}" for s in self.schedulers)
            if key == "goodput_tps" and {"past-future", "oracle"} <= set(self.schedulers):
                head += f"{'pf/oracle':>11}"
            out.append(head)
            for p in self.points:
                row = f"{p:>12g}"
                for s in self.schedulers:
                    row += "  " + fmt.format(self.results[(p, s)].summary[key])
                if key == "goodput_tps" and {"past-future", "oracle"} <= set(self.schedulers):
                    o = self.results[(p, "oracle")].summary[key]
                    ratio = self.results[(p, "past-future")].summary[key] / o if o else math.nan
                    row += f"{ratio:>11.2f}"
                out.append(row)
        return "\n".join(out)

    def to_json(self) -> str:
        return json.dumps(
            {
                "load": self.load,
                "sla": self.sla,
                "results": [
                    {self.load: p, "scheduler": s, **self.results[(p, s)].summary}
                    for p in self.points
                    for s in self.schedulers
                ],
            },
            indent=1,
        )


def sweep(
    trace: Trace,
    schedulers: Sequence[str] = POLICIES,
    rate_scales: Optional[Iterable[float]] = None,
    clients: Optional[Iterable[int]] = None,
    *,
    model: str = "llama-2-7b",
    hardware: str = "a100-80gb",
    kv_cache_tokens: int = 120_000,
    sla: Optional[Mapping[str, float]] = None,
    progress: bool = True,
    workers: Optional[int] = None,
    **engine: object,
) -> SweepReport:
    """Every scheduler at every load point, open loop (``rate_scales``) or closed loop
    (``clients``). Runs in parallel threads (the core releases the GIL)."""
    if (rate_scales is None) == (clients is None):
        raise ValueError("give exactly one of rate_scales (open loop) or clients (closed loop)")
    schedulers = list(schedulers)
    if not schedulers:
        raise ValueError("schedulers is empty")
    for s in schedulers:
        if s not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {s!r}; known: {', '.join(SCHEDULERS)}")
    load = "rate_scale" if rate_scales is not None else "clients"
    points = [float(x) for x in rate_scales] if rate_scales is not None else [int(x) for x in clients]
    if not points:
        raise ValueError(f"no {load} given")
    sla = _check_sla(sla)
    report = SweepReport(load=load, points=points, schedulers=schedulers, sla=sla)
    jobs = [(p, s) for p in points for s in schedulers]
    common = dict(model=model, hardware=hardware, kv_cache_tokens=kv_cache_tokens, sla=sla, **engine)

    def run(job):
        p, s = job
        kw = {"rate_scale": p} if load == "rate_scale" else {"clients": p}
        return job, simulate(trace, s, **kw, **common)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="simulating", unit="run", leave=False)
    pool = ThreadPoolExecutor(max_workers=workers or min(len(jobs), os.cpu_count() or 1))
    try:
        for job, result in pool.map(run, jobs):
            report.results[job] = result
            if bar is not None:
                bar.update()
    finally:
        # A run that raised: the runs not started are dropped (those running end on their own),
        # and the bar is cleared, so that the error stands alone.
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return report


def fit_linear_cost(num_tokens, num_seqs, attention_pairs, seconds) -> List[float]:
    """Fit ``t = c0 + c1*tokens + c2*seqs + c3*attention_pairs`` to measured step times; pass the
    result to ``simulate(..., cost_coef=...)`` to simulate a measured engine."""
    arrays = [np.ascontiguousarray(x, dtype=np.float64) for x in (num_tokens, num_seqs, attention_pairs, seconds)]
    return list(_core.fit_linear_cost(*arrays))
