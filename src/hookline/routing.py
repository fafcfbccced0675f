"""Which upstream a job's attempt goes to: routes with fallback, and the circuit breakers.

A model name is served either by a ``[[routes]]`` entry (several upstreams, tried in order or
drawn by weight for the first try) or, without one, by the first upstream whose ``models``
patterns match. :meth:`Router.choose` picks the first try's upstream at submit;
:meth:`Router.fallback` the next one after a retryable failure (the route's next target at
once; past the last target, the first again after the usual backoff); :meth:`Router.model_for`
the model name the upstream is asked for.

Each upstream has a :class:`Circuit`: after ``circuit_failures`` retryable failures in a row it
opens and nothing is sent there for ``circuit_cooldown_seconds``; then it is half-open and one
trial call decides (a success closes it, a failure opens it again). Routing skips upstreams
whose circuit is open while another target is usable. A circuit's change in one process is
announced (``publish``, which the queue wires to the notifier: on PostgreSQL the broadcast
carries it to every process) and applied by :meth:`Router.apply` everywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Callable

from hookline.clock import Clock
from hookline.config import RouteConfig, RouteTarget, Settings, UpstreamConfig
from hookline.errors import InvalidRequest

CIRCUIT_TOPIC = "upstream.circuit"  # payload: "<upstream> <open|closed> <opened_at ms>"


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass
class Circuit:
    failures_to_open: int
    cooldown_ms: int
    failures: int = 0  # retryable failures in a row
    opened_at: int | None = None
    trial_until: int = 0  # a half-open circuit's trial call is out until then

    def state(self, now: int) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if now < self.opened_at + self.cooldown_ms:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def retry_in(self, now: int) -> float:
        """Seconds until the circuit half-opens (0 when it is not open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, (self.opened_at + self.cooldown_ms - now) / 1000)


@dataclasses.dataclass(frozen=True)
class Choice:
    upstream: str
    immediate: bool  # a fallback to another target: no backoff


class Router:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        publish: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.publish = publish
        self.upstreams = {u.name: u for u in settings.upstreams}
        self.routes = {r.model: r for r in settings.routes}
        self.circuits = {
            u.name: Circuit(u.circuit_failures, int(u.circuit_cooldown_seconds * 1000))
            for u in settings.upstreams
        }

    # --- routing

    def choose(self, model: str, operation: str) -> UpstreamConfig:
        """The upstream of a new job's first try, or :class:`InvalidRequest` when none serves
        ``model`` with ``operation``."""
        route = self.routes.get(model)
        if route is None:
            upstream = self.settings.upstream_for(model)
            if not upstream.runs(operation):
                raise InvalidRequest(
                    f"upstream {upstream.name!r} (type {upstream.type}), which serves model "
                    f"{model!r}, does not run operation {operation!r}; it runs "
                    f"{', '.join(upstream.operations_run())} (an upstream declares more in its "
                    "`operations`)"
                )
            return upstream
        targets = self._targets(route, operation)
        if not targets:
            raise InvalidRequest(f"no target of route {model!r} runs {operation}")
        usable = [t for t in targets if self._usable(t.upstream)] or targets
        if route.strategy == "weight" and len(usable) > 1:
            target = random.choices(usable, weights=[t.weight for t in usable])[0]
        else:
            target = usable[0]
        return self.upstreams[target.upstream]

    def fallback(self, model: str, operation: str, upstream: str) -> Choice:
        """Where the next try of a job of ``model`` goes after ``upstream`` failed (retryably):
        the route's next target whose circuit is not open, at once; past the last target, the
        first usable one again, after the backoff. Without a route: ``upstream`` again."""
        route = self.routes.get(model)
        if route is None:
            return Choice(upstream, immediate=False)
        targets = self._targets(route, operation)
        names = [t.upstream for t in targets]
        position = names.index(upstream) if upstream in names else -1
        for target in targets[position + 1 :]:
            if self._usable(target.upstream):
                return Choice(target.upstream, immediate=True)
        for target in targets[: position + 1]:
            if self._usable(target.upstream):
                return Choice(target.upstream, immediate=False)
        return Choice(names[0] if names else upstream, immediate=False)

    def model_for(self, model: str, upstream: str) -> str:
        """The model name ``upstream`` is asked for when a job asks for ``model``."""
        route = self.routes.get(model)
        if route is not None:
            for target in route.targets:
                if target.upstream == upstream:
                    return target.model or model
        return model

    def models(self) -> list[tuple[str, str]]:
        """(model, owner) of every route and of every upstream's models that are not patterns."""
        listed = [(route.model, "hookline") for route in self.settings.routes]
        names = {model for model, _ in listed}
        for upstream in self.settings.upstreams:
            for model in upstream.models:
                if not any(c in model for c in "*?[") and model not in names:
                    listed.append((model, upstream.name))
                    names.add(model)
        return listed

    def _targets(self, route: RouteConfig, operation: str) -> list[RouteTarget]:
        return [
            t
            for t in route.targets
            if t.upstream in self.upstreams and self.upstreams[t.upstream].runs(operation)
        ]

    def _usable(self, upstream: str) -> bool:
        circuit = self.circuits.get(upstream)
        return circuit is None or circuit.state(self.clock.now_ms()) is not CircuitState.OPEN

    # --- circuits

    def admit(self, upstream: str) -> float | None:
        """Whether a call to ``upstream`` may go out now: None if so, else the seconds until
        its circuit half-opens. A half-open circuit admits one trial call at a time."""
        circuit = self.circuits.get(upstream)
        if circuit is None:
            return None
        now = self.clock.now_ms()
        state = circuit.state(now)
        if state is CircuitState.CLOSED:
            return None
        if state is CircuitState.HALF_OPEN and now >= circuit.trial_until:
            circuit.trial_until = now + circuit.cooldown_ms  # the trial's turn
            return None
        return max(circuit.retry_in(now), 0.05)

    def succeeded(self, upstream: str) -> None:
        circuit = self.circuits.get(upstream)
        if circuit is None:
            return
        was_open = circuit.opened_at is not None
        circuit.failures, circuit.opened_at, circuit.trial_until = 0, None, 0
        if was_open:
            self._announce(upstream, circuit)

    def failed(self, upstream: str) -> None:
        """A retryable failure of a call to ``upstream``."""
        circuit = self.circuits.get(upstream)
        if circuit is None:
            return
        now = self.clock.now_ms()
        circuit.failures += 1
        half_open = circuit.state(now) is CircuitState.HALF_OPEN
        if half_open or (
            circuit.opened_at is None and circuit.failures >= circuit.failures_to_open
        ):
            circuit.opened_at, circuit.trial_until = now, 0
            self._announce(upstream, circuit)

    def state(self, upstream: str) -> CircuitState:
        circuit = self.circuits.get(upstream)
        return CircuitState.CLOSED if circuit is None else circuit.state(self.clock.now_ms())

    def _announce(self, upstream: str, circuit: Circuit) -> None:
        if self.publish is not None:
            state = "closed" if circuit.opened_at is None else "open"
            self.publish(CIRCUIT_TOPIC, f"{upstream} {state} {circuit.opened_at or 0}")

    def apply(self, payload: str) -> None:
        """Another process's circuit change (:data:`CIRCUIT_TOPIC`'s payload)."""
        try:
            upstream, state, opened_at = payload.split(" ")
            circuit = self.circuits[upstream]
            when = int(opened_at)
        except (KeyError, ValueError):
            return
        if state == "open":
            circuit.opened_at = max(circuit.opened_at or 0, when)
            circuit.trial_until = 0
        else:
            circuit.failures, circuit.opened_at, circuit.trial_until = 0, None, 0
