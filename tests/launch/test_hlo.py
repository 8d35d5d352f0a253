"""hlo.program_cost: matmul FLOPs and HBM bytes of a compiled program, its loops weighted by their
trip counts, checked against XLA's own cost analysis where that is right (no loops)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from robot_r1_jax.launch import hlo

X = jnp.ones((24, 40), jnp.float32)
W = jnp.ones((40, 40), jnp.float32)
LAYERS = 7


def _compiled(fn, *args) -> jax.stages.Compiled:
  return jax.jit(fn).lower(*args).compile()


def _one_matmul() -> jax.stages.Compiled:
  return _compiled(lambda x, w: jnp.tanh(x @ w), X, W)


def test_without_loops_the_flops_are_xla_s():
  compiled = _one_matmul()
  assert hlo.program_cost(compiled.as_text()).flops == compiled.cost_analysis()["flops"] == (
      2 * 24 * 40 * 40)
  batched = _compiled(lambda x, w: jnp.einsum("btd,df->btf", jnp.stack([x, x, x]), w), X, W)
  assert hlo.program_cost(batched.as_text()).flops == 3 * 2 * 24 * 40 * 40
  # Bytes: a fusion reads its operands and writes its result, as XLA counts them.
  assert hlo.program_cost(compiled.as_text()).bytes == compiled.cost_analysis()["bytes accessed"]


def test_a_convolution_counts_only_taps_on_input():
  """Padding and dilation holes multiply nothing: a padded, dilated convolution's FLOPs are XLA's."""
  image, kernel = jnp.ones((2, 3, 17, 19)), jnp.ones((5, 3, 4, 3))
  conv = _compiled(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (2, 1), ((3, 2), (1, 1)), lhs_dilation=(1, 2), rhs_dilation=(2, 1)), image, kernel)
  assert hlo.program_cost(conv.as_text()).flops == conv.cost_analysis()["flops"]


def test_a_loop_body_counts_once_per_iteration():
  one = hlo.program_cost(_one_matmul().as_text())
  looped = _compiled(lambda x, w: jax.lax.fori_loop(0, 11, lambda i, x: jnp.tanh(x @ w), x), X, W)
  # XLA's cost analysis counts the body once (and the counter's add and compare): the reason
  # program_cost exists.
  assert looped.cost_analysis()["flops"] == one.flops + 2
  cost = hlo.program_cost(looped.as_text())
  assert cost.flops == 11 * one.flops and cost.assumed_loops == 0


def test_nested_loops_multiply_and_a_scan_reads_one_layer_per_step():
  stacked = jnp.ones((LAYERS, 40, 40), jnp.float32)

  def layers(x, ws, inner):
    step = lambda x, w: (jax.lax.fori_loop(0, inner, lambda i, x: jnp.tanh(x @ w), x), None)
    return jax.lax.scan(step, x, ws)[0]

  one = hlo.program_cost(_one_matmul().as_text())
  for inner in (1, 3):
    cost = hlo.program_cost(_compiled(lambda x, ws: layers(x, ws, inner), X, stacked).as_text())
    assert cost.flops == LAYERS * inner * one.flops
    # Each step reads its own [40, 40] slice of the stack (CPU copies it out: 2 slices, and the
    # carry is copied in once), not the whole [7, 40, 40] array (7 slices more).
    assert cost.bytes - LAYERS * inner * one.bytes < LAYERS * 3 * stacked[0].nbytes


def test_a_loop_that_stops_on_data_is_charged_the_given_count():
  def until(x, w, limit):
    return jax.lax.while_loop(lambda c: c[0] < limit, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)),
                              (0, x))[1]

  one = hlo.program_cost(_one_matmul().as_text())
  text = _compiled(until, X, W, 5).as_text()
  assert hlo.program_cost(text, unknown_trips=13) == hlo.Cost(13 * one.flops,
                                                              hlo.program_cost(text, 13).bytes, 1)
  assert hlo.program_cost(text, unknown_trips=13).flops == 13 * one.flops


def test_a_data_stopped_loop_without_matmuls_counts_once():
  """A retry (top-p's redraw: before the decode loop for the first token, inside it for the rest)
  is charged one round wherever it runs; only the loop that multiplies takes the decode budget."""
  def retry(r):
    return jax.lax.while_loop(lambda r: jnp.sum(r) > 1.0, lambda r: jnp.tanh(r) - 0.5, r)

  def decode(x, w, limit):
    return jax.lax.while_loop(lambda c: c[0] < limit,
                              lambda c: (c[0] + 1, retry(jnp.tanh(c[1] @ w))), (0, retry(x)))[1]

  one = hlo.program_cost(_one_matmul().as_text())
  alone = _compiled(retry, X).as_text()
  assert hlo.program_cost(alone, unknown_trips=13) == hlo.program_cost(alone, unknown_trips=1)
  assert hlo.program_cost(alone).bytes > 0
  text = _compiled(decode, X, W, 5).as_text()
  cost = hlo.program_cost(text, unknown_trips=13)
  assert cost.flops == 13 * one.flops and cost.assumed_loops == 3
  # Each extra decode step adds one step's bytes, its retry's one round among them.
  per_step = hlo.program_cost(text, unknown_trips=2).bytes - hlo.program_cost(text, 1).bytes
  assert cost.bytes == pytest.approx(hlo.program_cost(text, 1).bytes + 12 * per_step)
  assert per_step > hlo.program_cost(alone).bytes


def test_an_in_place_update_costs_the_update_not_the_buffer():
  cache = jnp.zeros((64, 24, 40), jnp.float32)
  write = lambda c, x: jax.lax.fori_loop(
      0, 64, lambda i, c: jax.lax.dynamic_update_slice(c, jnp.tanh(x)[None], (i, 0, 0)), c)
  cost = hlo.program_cost(jax.jit(write, donate_argnums=0).lower(cache, X).compile().as_text())
  # 64 writes of one [24, 40] row (and their reads of x), not 64 copies of the cache.
  assert cost.bytes < 4 * cache.nbytes
  assert cost.bytes >= 64 * X.nbytes


def test_a_conditional_counts_its_dearest_branch():
  pick = lambda x, w, p: jax.lax.cond(p, lambda: x @ w @ w, lambda: x)
  cost = hlo.program_cost(_compiled(pick, X, W, True).as_text())
  assert cost.flops == 2 * hlo.program_cost(_one_matmul().as_text()).flops


_ON_CHIP = """HloModule m, entry_computation_layout={(bf16[1024]{0})->bf16[1024]{0}}

%pass_through (p.1: bf16[1024]) -> bf16[1024] {
  %p.1 = bf16[1024]{0} parameter(0)
  ROOT %b.1 = bf16[1024]{0} bitcast(%p.1)
}

ENTRY %main (p: bf16[1024]) -> bf16[1024] {
  %p = bf16[1024]{0} parameter(0)
  %cs = (bf16[1024]{0:S(1)}, bf16[1024]{0}, u32[]{:S(2)}) copy-start(%p)
  %cd = bf16[1024]{0:S(1)} copy-done(%cs)
  %n = bf16[1024]{0} negate(%cd)
  ROOT %f = bf16[1024]{0} fusion(%n), kind=kLoop, calls=%pass_through
}
"""


# TPU's async slices (v5e's decode streams each weight into vector memory in windows like these):
# the start names the whole source, but moves one window.
_WINDOWS = """HloModule m, entry_computation_layout={(bf16[2048,512]{1,0})->bf16[2048,512]{1,0}}

ENTRY %main (w: bf16[2048,512]) -> bf16[2048,512] {
  %w = bf16[2048,512]{1,0} parameter(0)
  %s0 = ((bf16[2048,512]{1,0}), bf16[512,512]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:512], [0:512]}
  %d0 = bf16[512,512]{1,0:S(1)} slice-done(%s0)
  %s1 = ((bf16[2048,512]{1,0}), bf16[512,512]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[512:1024], [0:512]}
  %d1 = bf16[512,512]{1,0:S(1)} slice-done(%s1)
  %s2 = ((bf16[2048,512]{1,0}), bf16[1024,512]{1,0}, s32[]{:S(2)}) slice-start(%w), slice={[1024:2048], [0:512]}
  %d2 = bf16[1024,512]{1,0} slice-done(%s2)
  ROOT %c = bf16[2048,512]{1,0:S(1)} concatenate(%d0, %d1, %d2), dimensions={0}
}
"""


# The same slices as XLA's dump prints them (`--xla_dump_to`): each an async-start calling a
# computation that holds a plain `slice`.
_WINDOWS_CALLED = """HloModule m, entry_computation_layout={(bf16[2048,512]{1,0})->bf16[2048,512]{1,0}}

%async_computation (p.0: bf16[2048,512]) -> bf16[512,512] {
  %p.0 = bf16[2048,512]{1,0} parameter(0)
  ROOT %slice.0 = bf16[512,512]{1,0:S(1)} slice(%p.0), slice={[0:512], [0:512]}
}

%async_computation.1 (p.1: bf16[2048,512]) -> bf16[512,512] {
  %p.1 = bf16[2048,512]{1,0} parameter(0)
  ROOT %slice.1 = bf16[512,512]{1,0:S(1)} slice(%p.1), slice={[512:1024], [0:512]}
}

%async_computation.2 (p.2: bf16[2048,512]) -> bf16[1024,512] {
  %p.2 = bf16[2048,512]{1,0} parameter(0)
  ROOT %slice.2 = bf16[1024,512]{1,0} slice(%p.2), slice={[1024:2048], [0:512]}
}

ENTRY %main (w: bf16[2048,512]) -> bf16[2048,512] {
  %w = bf16[2048,512]{1,0} parameter(0)
  %s0 = ((bf16[2048,512]{1,0}), bf16[512,512]{1,0:S(1)}, s32[]{:S(2)}) async-start(%w), calls=%async_computation
  %d0 = bf16[512,512]{1,0:S(1)} async-done(%s0)
  %s1 = ((bf16[2048,512]{1,0}), bf16[512,512]{1,0:S(1)}, s32[]{:S(2)}) async-start(%w), calls=%async_computation.1
  %d1 = bf16[512,512]{1,0:S(1)} async-done(%s1)
  %s2 = ((bf16[2048,512]{1,0}), bf16[1024,512]{1,0}, s32[]{:S(2)}) async-start(%w), calls=%async_computation.2
  %d2 = bf16[1024,512]{1,0} async-done(%s2)
  ROOT %c = bf16[2048,512]{1,0:S(1)} concatenate(%d0, %d1, %d2), dimensions={0}
}
"""


@pytest.mark.parametrize("text", [_WINDOWS, _WINDOWS_CALLED], ids=["as_text", "dump"])
def test_an_async_slice_moves_its_window_not_its_source(text):
  """Three windows of a 2 MiB weight read it once (2 MiB), and the one written to HBM is written
  (1 MiB), then the concatenate reads that 1 MiB: 4 MiB, where charging each start its whole
  source read 8. Printed as XLA dumps it, a window written into vector memory read 0 (a slice was
  charged its result twice, where it lies), and the 3B decode on v5e 2.2 TB against 4.16."""
  assert hlo.program_cost(text).bytes == (2 + 1 + 1) * 2**20


def test_only_hbm_traffic_counts():
  """TPU layouts mark on-chip memory (S(1), S(2)): a prefetch into it reads HBM once, an op on
  the prefetched copy reads no HBM; a fusion that passes its operand out whole reads all of it."""
  # copy-start: the 2 KiB HBM source; negate: writes 2 KiB; the fusion: reads and writes 2 KiB.
  assert hlo.program_cost(_ON_CHIP).bytes == 4 * 2048


# TPU's async collective fusion: one all-gather (channel 5) split over a start, a continuation
# (which also computes) and a done fusion, each holding a copy of it and passing the shard and
# the gathered buffer along (aliased).
_SPLIT_GATHER = """HloModule m, entry_computation_layout={(bf16[6,256]{1,0}, f32[16,16]{1,0})->(f32[16,16]{1,0}, bf16[24,256]{1,0})}

%start (p.0: bf16[6,256]) -> (bf16[6,256], bf16[24,256]) {
  %p.0 = bf16[6,256]{1,0} parameter(0)
  %ag.0 = bf16[24,256]{1,0} all-gather(%p.0), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t.0 = (bf16[6,256]{1,0}, bf16[24,256]{1,0}) tuple(%p.0, %ag.0)
}

%continue (p.1: bf16[6,256], p.2: bf16[24,256], x.1: f32[16,16]) -> (f32[16,16], bf16[6,256], bf16[24,256], bf16[24,256]) {
  %p.1 = bf16[6,256]{1,0} parameter(0)
  %p.2 = bf16[24,256]{1,0} parameter(1)
  %x.1 = f32[16,16]{1,0} parameter(2)
  %ag.1 = bf16[24,256]{1,0} all-gather(%p.1), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
  %n.1 = f32[16,16]{1,0} negate(%x.1)
  ROOT %t.1 = (f32[16,16]{1,0}, bf16[6,256]{1,0}, bf16[24,256]{1,0}, bf16[24,256]{1,0}) tuple(%n.1, %p.1, %p.2, %ag.1)
}

%done (p.3: bf16[6,256], p.4: bf16[24,256]) -> bf16[24,256] {
  %p.3 = bf16[6,256]{1,0} parameter(0)
  %p.4 = bf16[24,256]{1,0} parameter(1)
  ROOT %ag.2 = bf16[24,256]{1,0} all-gather(%p.3), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}
}

ENTRY %main (w: bf16[6,256], x: f32[16,16]) -> (f32[16,16], bf16[24,256]) {
  %w = bf16[6,256]{1,0} parameter(0)
  %x = f32[16,16]{1,0} parameter(1)
  %s = (bf16[6,256]{1,0}, bf16[24,256]{1,0}) fusion(%w), kind=kCustom, calls=%start
  %s.0 = bf16[6,256]{1,0} get-tuple-element(%s), index=0
  %s.1 = bf16[24,256]{1,0} get-tuple-element(%s), index=1
  %c = (f32[16,16]{1,0}, bf16[6,256]{1,0}, bf16[24,256]{1,0}, bf16[24,256]{1,0}) fusion(%s.0, %s.1, %x), kind=kCustom, calls=%continue
  %c.0 = f32[16,16]{1,0} get-tuple-element(%c), index=0
  %c.1 = bf16[6,256]{1,0} get-tuple-element(%c), index=1
  %c.3 = bf16[24,256]{1,0} get-tuple-element(%c), index=3
  %d = bf16[24,256]{1,0} fusion(%c.1, %c.3), kind=kCustom, calls=%done
  ROOT %r = (f32[16,16]{1,0}, bf16[24,256]{1,0}) tuple(%c.0, %d)
}
"""


def test_a_collective_split_over_fusions_moves_its_bytes_once():
  """Three fusions carry copies of one all-gather: it reads the 3 KiB shard once and writes the
  12 KiB gathered buffer once; the continuation's own work reads and writes 1 KiB each; the
  shard and buffer passed along as they came cost nothing."""
  module = hlo.parse(_SPLIT_GATHER)
  assert module.copies == {"5": 3}
  assert hlo.program_cost(module).bytes == 3072 + 12288 + 2 * 1024


def test_parse_reads_operands_and_the_root():
  module = hlo.parse(_one_matmul().as_text())
  entry = module.computations[module.entry]
  root = entry[entry.root]
  assert root.opcode == "fusion" and all(o in entry.instructions for o in root.operands)
  fused = module.computations[hlo._callees(root)[0]]
  assert fused[fused.root].opcode == "tanh"


_TPU_SCRIPT = """
import json, os
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from robot_r1_jax.launch import hlo
jax.config.update("jax_enable_compilation_cache", False)
devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
one = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec())
bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=one)
cases = {
    "matmul": (lambda x, w: x @ w, (bf16(24, 40), bf16(40, 56))),
    "decode scores": (lambda q, k: jnp.einsum("bkqth,bkhs->bkqts", q, k),
                      (bf16(4, 1, 3, 1, 16), bf16(4, 1, 16, 576))),
    "prefill scores": (lambda q, k: jnp.einsum("bkqth,bksh->bkqts", q, k),
                       (bf16(3, 2, 3, 40, 16), bf16(3, 2, 56, 16))),
    "head split": (lambda x, w: jnp.einsum("btd,dnh->btnh", x, w),
                   (bf16(8, 1, 64), bf16(64, 7, 16))),
}
out = {}
for name, (fn, args) in cases.items():
  compiled = jax.jit(fn).lower(*args).compile()
  out[name] = [compiled.cost_analysis()["flops"], hlo.program_cost(compiled.as_text()).flops]
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tpu_convolutions_count_as_xla_counts_them():
  """TPU writes dots as convolutions: a batched one over the batch with a dilated input, a
  one-token projection to heads with a window over padding; without loops, the FLOPs equal XLA's
  TPU cost analysis."""
  proc = subprocess.run([sys.executable, "-c", _TPU_SCRIPT], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  flops = json.loads(proc.stdout.splitlines()[-1])
  assert flops == {"matmul": [2 * 24 * 40 * 56] * 2, "decode scores": [2 * 4 * 3 * 576 * 16] * 2,
                   "prefill scores": [2 * 3 * 2 * 3 * 40 * 56 * 16] * 2,
                   "head split": [2 * 8 * 64 * 7 * 16] * 2}


_TPU_LOOP_SCRIPT = """
import json, os
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from robot_r1_jax.launch import hlo
jax.config.update("jax_enable_compilation_cache", False)
mesh = Mesh(np.array(topologies.get_topology_desc(topology_name="v5e:2x2",
                                                  platform="tpu").devices), ("fsdp",))
spec = lambda shape, *axes: jax.ShapeDtypeStruct(shape, jnp.bfloat16,
                                                 sharding=NamedSharding(mesh, P(*axes)))
whole = NamedSharding(mesh, P())

def layers(x, up, down):
  def step(x, weights):
    u, d = (jax.lax.with_sharding_constraint(w, whole) for w in weights)
    return x + jnp.tanh(x @ u) @ d, None
  return jax.lax.scan(step, x, (up, down))[0]

module = hlo.parse(jax.jit(layers).lower(spec((4096, 2048), "fsdp"),
                                         spec((6, 2048, 8192), None, "fsdp"),
                                         spec((6, 8192, 2048), None, None, "fsdp")
                                         ).compile().as_text())
loop = [l for l in hlo.loop_collectives(module) if l.counts]
print(json.dumps([max(module.copies.values()), [(l.counts, l.bytes) for l in loop]]))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_tpu_fsdp_loop_gathers_each_weight_once_per_step():
  """An FSDP layer stack on v5e:2x2: each step gathers its two [2048, 8192] bf16 weights, 64 MiB,
  though TPU's async collective fusion writes one of those gathers into three fusions."""
  proc = subprocess.run([sys.executable, "-c", _TPU_LOOP_SCRIPT], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  copies, loops = json.loads(proc.stdout.splitlines()[-1])
  assert copies > 1  # the split this test is about happened
  assert loops == [[{"all-gather": 2}, {"all-gather": 2 * 2048 * 8192 * 2}]]
