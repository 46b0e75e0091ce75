"""The pair-aligned queue against a numpy ring buffer (method.md §4.5, item 31)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cots_jax import queue as queue_lib

K, B, D = 6, 2, 3


def test_check_queue_size_accepts_multiples():
  for size, batch in [(6, 2), (6, 6), (4096, 64)]:
    queue_lib.check_queue_size(size, batch)


@pytest.mark.parametrize("size, batch", [(7, 2), (2, 4), (0, 2), (6, 0)])
def test_check_queue_size_names_both_fields_in_one_line(size, batch):
  with pytest.raises(ValueError) as info:
    queue_lib.check_queue_size(size, batch)
  message = str(info.value)
  assert "queue.size" in message and "input.batch_size" in message
  assert f"={size}" in message and f"={batch}" in message
  assert "\n" not in message


def test_init_queue_is_empty_with_unit_keys():
  q = queue_lib.init_queue(K, D, jax.random.PRNGKey(0))
  for name in ("img", "txt"):
    assert q[name].shape == (K, D) and q[name].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(q[name], axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(q["img"], q["txt"])
  np.testing.assert_array_equal(q["idx"], -1)
  assert q["idx"].dtype == jnp.int32
  assert q["valid"].dtype == jnp.bool_ and not np.any(q["valid"])
  assert q["ptr"].dtype == jnp.int32 and int(q["ptr"]) == 0


def _batch(step):
  """Pair ids step*B .. step*B+B-1; image and text keys encode the id differently."""
  ids = np.arange(step * B, step * B + B)
  img = np.stack([ids, ids + 0.5, -ids], axis=1).astype(np.float32)
  txt = np.stack([2 * ids, ids - 0.25, ids * ids], axis=1).astype(np.float32)
  valid = ids % 3 != 1
  return img, txt, ids, valid


def test_enqueue_wraps_around_like_a_numpy_ring_buffer_under_jit():
  traces = []

  @jax.jit
  def step(q, img, txt, ids, valid):
    traces.append(None)
    return queue_lib.enqueue(q, img, txt, ids, valid)

  q = queue_lib.init_queue(K, D, jax.random.PRNGKey(1))
  ring = {"img": np.asarray(q["img"]).copy(), "txt": np.asarray(q["txt"]).copy(),
          "idx": np.full(K, -1), "valid": np.zeros(K, bool)}
  ptr = 0
  for n in range(2 * K // B + 1):  # a bit more than two full laps
    img, txt, ids, valid = _batch(n)
    q = step(q, jnp.asarray(img), jnp.asarray(txt), jnp.asarray(ids), jnp.asarray(valid))
    for row in range(B):
      slot = (ptr + row) % K
      ring["img"][slot], ring["txt"][slot] = img[row], txt[row]
      ring["idx"][slot], ring["valid"][slot] = ids[row], valid[row]
    ptr = (ptr + B) % K
    for name, want in ring.items():
      np.testing.assert_array_equal(q[name], want, err_msg=f"{name} after enqueue {n}")
    assert int(q["ptr"]) == ptr
  assert len(traces) == 1  # ptr is traced, not baked into the compiled step


def test_enqueue_keeps_image_and_text_of_a_pair_in_the_same_slot():
  q = queue_lib.init_queue(K, D, jax.random.PRNGKey(2))
  for n in range(5):
    img, txt, ids, valid = _batch(n)
    q = queue_lib.enqueue(q, jnp.asarray(img), jnp.asarray(txt), jnp.asarray(ids),
                          jnp.asarray(valid))
  for slot in range(K):
    pair = int(q["idx"][slot])
    img, txt, ids, valid = _batch(pair // B)
    row = pair - pair // B * B
    np.testing.assert_array_equal(q["img"][slot], img[row])
    np.testing.assert_array_equal(q["txt"][slot], txt[row])
    assert bool(q["valid"][slot]) == bool(valid[row])


def test_enqueue_stores_bfloat16_keys_as_float32():
  q = queue_lib.init_queue(K, D, jax.random.PRNGKey(3))
  img, txt, ids, valid = _batch(0)
  q = queue_lib.enqueue(q, jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16),
                        jnp.asarray(ids), jnp.asarray(valid))
  assert q["img"].dtype == q["txt"].dtype == jnp.float32 and q["idx"].dtype == jnp.int32
  rounded = np.asarray(jnp.asarray(img, jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(q["img"][:B], rounded)


def test_enqueue_rejects_a_batch_that_does_not_divide_the_queue():
  q = queue_lib.init_queue(K, D, jax.random.PRNGKey(4))
  with pytest.raises(ValueError, match="queue.size"):
    queue_lib.enqueue(q, jnp.zeros((4, D)), jnp.zeros((4, D)), jnp.zeros(4, jnp.int32),
                      jnp.ones(4, bool))
