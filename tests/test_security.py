"""Security properties of the source and of the libraries it leans on (issue 9):

- no pickle (or marshal, shelve), eval, exec, compile or dynamic import of request data: the
  source tree is parsed and every such construct is either absent or on a short allow-list of
  imports whose module names come from constant tables;
- every gRPC server and channel is built by pagedserve.runtime.serving, which sets the message-size
  limits (and TLS), and those limits hold on the wire;
- chat templates render in transformers' sandboxed Jinja environment: a template cannot reach
  Python internals or read files, and message content is data, never template code.
"""

import ast
import asyncio
import pathlib

import grpc
import jinja2.sandbox
import pytest
from transformers.utils import chat_template_utils

from pagedserve.gateway.scheduler_client import ServedModel
from pagedserve.runtime.chat import chat_prompt_ids
from pagedserve.runtime.serving import MAX_MESSAGE_BYTES, GrpcServer, aio_channel, free_ports
from pagedserve.testing.tiny_models import byte_level_tokenizer
from pagedserve.v1 import common_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["gateway", "scheduler_svc", "executor_svc", "kernels", "proto", "pagedserve",
               "benchmarks"]
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
# module -> the constant table its dynamic imports read their module names from. Nothing else
# may import by a computed name (and these tables are code, never request data).
DYNAMIC_IMPORTS = {"pagedserve/__init__.py": "_LAZY_EXPORTS",
                   "pagedserve/entrypoints/cli.py": "SERVICES",
                   "executor_svc/pagedserve/executor/models/__init__.py": "ARCHITECTURES"}
# gRPC constructors that must only be called in pagedserve/runtime/serving.py.
GRPC_FACTORIES = {"server", "insecure_channel", "secure_channel"}
# Clients of the public API only (load generators), like any external client: not services.
GRPC_CLIENT_TOOLS = {"pagedserve/bench/serve.py"}


def source_files() -> list[pathlib.Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")
                  if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def relative(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def dotted(node: ast.AST) -> str:
    """`grpc.aio.server` for an attribute chain, the name for a Name, "" otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def findings(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] \
                in FORBIDDEN_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{where}: {name}()")
            elif name.endswith(("import_module", "torch.load", "yaml.load", "yaml.unsafe_load")):
                found.append(f"{where}: {name}()")
            found += [f"{where}: {name}({k.arg}=True)" for k in node.keywords
                      if k.arg in ("trust_remote_code", "allow_pickle")
                      and not (isinstance(k.value, ast.Constant) and k.value.value is False)]
    return found


def test_no_pickle_eval_exec_or_dynamic_import_of_request_data():
    allowed = []
    unexpected = []
    for path in source_files():
        for finding in findings(path):
            table = DYNAMIC_IMPORTS.get(relative(path))
            if table and finding.endswith("import_module()"):
                allowed.append((path, table))
            else:
                unexpected.append(finding)
    assert not unexpected, "\n".join(unexpected)
    # The allow-listed dynamic imports really read their names from their constant table.
    for path, table in allowed:
        source = path.read_text()
        assert f"\n{table} = {{" in source, f"{relative(path)}: no module-level {table} table"
    assert {relative(p) for p, _ in allowed} == set(DYNAMIC_IMPORTS)


def test_the_scan_finds_what_it_forbids(tmp_path):
    """The scanner itself: each forbidden construct is reported."""
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\nfrom marshal import loads\neval('1')\nexec('x=1')\n"
                      "__import__('os')\nimportlib.import_module(name)\ntorch.load(f)\n"
                      "AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
                      "model.eval()\n")
    found = findings(sample, tmp_path)
    assert len(found) == 8, found  # model.eval() is a method, not the builtin


def test_every_grpc_server_and_channel_is_built_by_serving():
    """So every one of them has the message-size limits and TLS (pagedserve.runtime.serving)."""
    offenders = []
    for path in source_files():
        if relative(path) in ("pagedserve/runtime/serving.py", *GRPC_CLIENT_TOOLS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = dotted(node.func)
                if name.startswith("grpc.") and name.rsplit(".", 1)[-1] in GRPC_FACTORIES:
                    offenders.append(f"{relative(path)}:{node.lineno}: {name}()")
    assert not offenders, "build them with pagedserve.runtime.serving:\n" + "\n".join(offenders)


def test_message_limits_hold_on_the_wire():
    """A message over gRPC's 4 MiB default passes between a GrpcServer and an aio_channel; one
    over MAX_MESSAGE_BYTES is refused with RESOURCE_EXHAUSTED."""
    async def echo(request: bytes, context) -> bytes:
        return request

    async def run():
        (port,) = free_ports(1)
        server = GrpcServer(f"127.0.0.1:{port}")
        server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
        await server.start([])
        try:
            async with aio_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary("/test.Echo/Echo")
                big = b"x" * (8 * 2**20)
                assert await call(big, timeout=30) == big
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call(b"x" * (MAX_MESSAGE_BYTES + 1), timeout=30)
                assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await server.stop()
    asyncio.run(run())


# -- chat templates ----------------------------------------------------------------------

@pytest.fixture
def served(tmp_path) -> ServedModel:
    tokenizer = byte_level_tokenizer()
    return ServedModel(common_pb2.ModelInfo(model_id="tiny", max_model_len=256,
                                            vocab_size=len(tokenizer)), tokenizer)


def render(served: ServedModel, template: str, content: str = "hi") -> str:
    served.tokenizer.chat_template = template
    # The rendering itself (the gateway answers its errors with a 400 naming `messages`).
    ids = chat_prompt_ids(served.tokenizer, [{"role": "user", "content": content}], True)
    return served.tokenizer.decode(ids)


def test_chat_templates_compile_in_a_sandboxed_environment():
    template = chat_template_utils._compile_jinja_template("{{ messages }}")
    assert isinstance(template.environment, jinja2.sandbox.ImmutableSandboxedEnvironment)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{% set x = messages.append({'role': 'system'}) %}{{ x }}",  # immutable: no mutation
], ids=["subclasses", "globals", "builtins", "mutation"])
def test_a_template_cannot_reach_python_internals(served, template):
    with pytest.raises(jinja2.exceptions.SecurityError):
        render(served, template)


def test_a_template_cannot_read_files(served, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    for template in (f"{{% include '{secret}' %}}", f"{{% import '{secret}' as s %}}",
                     f"{{{{ open('{secret}').read() }}}}"):
        # No loader (include, import) and no `open`: either way an error, never the file.
        with pytest.raises((jinja2.exceptions.TemplateError, TypeError)) as error:
            render(served, template)
        assert "TOP-SECRET" not in str(error.value)


def test_message_content_is_data_not_template(served):
    text = render(served, "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                  "{{ 7 * 7 }}{% include '/etc/passwd' %}")
    assert text == "{{ 7 * 7 }}{% include '/etc/passwd' %}"
