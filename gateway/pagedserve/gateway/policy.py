"""What clients may ask of this gateway beyond the request rules, as its flags set it: whether
they may order the queue (`priority`), how their prefix-cache namespace is chosen
(`cache_salt`, salted by API key), whether the model may decide to call tools
(`tool_choice: "auto"`, read with the --tool-call-parser), and how their embeddings are pooled
(--pooler-config)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pagedserve.gateway.auth import ApiKeys, key_salt
from pagedserve.gateway.errors import GatewayError
from pagedserve.runtime.pooling import pooling_from_config
from pagedserve.runtime.request_rules import RuleError, check_cache_salt, check_priority
from pagedserve.runtime.serving import StartupError
from pagedserve.v1 import common_pb2


@dataclass(frozen=True)
class ClientPolicy:
    # --allow-client-priority: a client's non-zero priority is honoured (within the rules'
    # range); otherwise it is refused, since a low value runs first and is never preempted.
    allow_client_priority: bool = False
    # --cache-salt-per-api-key: every request's cache salt also names the key it came with, so
    # no two keys' requests share prefix-cache blocks (or see each other's hits).
    salt_keys: ApiKeys | None = None
    # --enable-auto-tool-choice: the --tool-call-parser that reads answers to tool_choice
    # "auto"; None: "auto" is refused.
    auto_tool_parser: str | None = None
    # --pooler-config: how /v1/embeddings pools (vLLM's default for decoder models: the last
    # token's hidden state, normalized).
    pooling: common_pb2.Pooling = field(default_factory=lambda: pooling_from_config(None))

    @classmethod
    def from_args(cls, args, keys: ApiKeys | None) -> ClientPolicy:
        """From the gateway's flags and its API keys (None without --api-key)."""
        if args.cache_salt_per_api_key and keys is None:
            raise StartupError("--cache-salt-per-api-key needs --api-key")
        if args.enable_auto_tool_choice and args.tool_call_parser is None:
            raise StartupError("--enable-auto-tool-choice needs --tool-call-parser (the format "
                               "the model writes calls in)")
        return cls(allow_client_priority=args.allow_client_priority,
                   salt_keys=keys if args.cache_salt_per_api_key else None,
                   auto_tool_parser=args.tool_call_parser if args.enable_auto_tool_choice
                   else None, pooling=pooling_config(args.pooler_config))

    def priority(self, priority: int) -> int:
        """The priority to submit with; a 400 naming `priority` when the client may not set it."""
        if priority and not self.allow_client_priority:
            raise GatewayError(400, "priority: this gateway does not let clients set a priority "
                               "(it runs with --allow-client-priority off)",
                               "invalid_request_error", "priority")
        _check(check_priority, priority)
        return priority

    def cache_salt(self, client_salt: str, authorization: str | None) -> str:
        """The salt to submit with, from the client's (empty: none) and, when salting by key,
        the API key of the `authorization` header (which auth has already matched)."""
        _check(check_cache_salt, client_salt)
        if self.salt_keys is None:
            return client_salt
        key = self.salt_keys.match(authorization)
        if key is None:  # auth answers 401 first; reaching here is a wiring bug
            raise GatewayError(401, "missing or invalid API key", "authentication_error")
        return key_salt(key, client_salt)


def pooling_config(raw: str | None) -> common_pb2.Pooling:
    """--pooler-config's JSON as the contract's Pooling; StartupError naming what is wrong."""
    try:
        config = None if raw is None else json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StartupError(f"--pooler-config: not JSON ({exc.msg})") from None
    if config is not None and not isinstance(config, dict):
        raise StartupError("--pooler-config: must be a JSON object")
    try:
        return pooling_from_config(config)
    except ValueError as exc:
        raise StartupError(f"--pooler-config.{exc}") from None


def _check(rule, value) -> None:
    try:
        rule(value)
    except RuleError as exc:
        raise GatewayError(400, str(exc), "invalid_request_error", exc.field) from None


# The gateway's defaults: no client priorities, cache salts only as clients send them.
DEFAULT_POLICY = ClientPolicy()
