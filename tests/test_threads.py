"""Concurrent use: Models in parallel threads answer as alone; one Model used from two threads
raises ModelBusyError for the second instead of mixing their batches; Ctrl-C (KeyboardInterrupt)
in the middle of a call leaves the Model usable."""

import _thread
import signal
import threading
import time

import pytest

import cmx
import llava_tiny as lt


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return lt.export_tiny_pair(tmp_path_factory.mktemp("threads"))


def question(image, text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]}]


def run_threads(fns):
    results, errors = [None] * len(fns), [None] * len(fns)

    def call(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001  (the test inspects it)
            errors[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, errors


def test_two_models_in_two_threads_answer_as_alone(pair):
    text, mmproj, images = pair
    models = [cmx.Model(text, mmproj=mmproj, n_ctx=1024, n_threads=1, sparsity=sp)
              for sp in (None, cmx.Sparsity(budget=30))]
    alone = [m.chat(question(img), max_tokens=12) for m, img in zip(models, images)]
    for _ in range(3):
        results, errors = run_threads([lambda m=m, img=img: (m.reset(), m.chat(question(img), max_tokens=12))[1]
                                       for m, img in zip(models, images)])
        assert errors == [None, None]
        assert results == alone


def test_second_thread_gets_a_clear_error_while_a_stream_is_open(pair):
    text, mmproj, images = pair
    m = cmx.Model(text, mmproj=mmproj, n_ctx=1024, n_threads=1)
    alone = m.chat(question(images[1]), max_tokens=8)
    m.reset()
    stream = m.chat(question(images[0]), max_tokens=8, stream=True)
    results, errors = run_threads([lambda: m.chat(question(images[1]), max_tokens=8)])
    assert isinstance(errors[0], cmx.ModelBusyError) and "another thread" in str(errors[0])
    first = "".join(stream)  # the stream itself is unharmed and releases the Model when done
    m.reset()
    assert m.chat(question(images[0]), max_tokens=8) == first
    results, errors = run_threads([lambda: (m.reset(), m.chat(question(images[1]), max_tokens=8))[1]])
    assert errors == [None] and results == [alone]


def test_one_model_hammered_by_two_threads_never_mixes_answers(pair):
    text, mmproj, images = pair
    m = cmx.Model(text, mmproj=mmproj, n_ctx=1024, n_threads=1)
    alone = {}
    for img in images:
        m.reset()
        alone[img] = m.chat(question(img), max_tokens=10)
    busy = 0
    for _ in range(6):
        results, errors = run_threads([lambda img=img: m.chat(question(img), max_tokens=10) for img in images])
        for img, r, e in zip(images, results, errors):
            if e is not None:
                assert isinstance(e, cmx.ModelBusyError), e
                busy += 1
            else:
                assert r == alone[img]
    m.reset()
    assert m.chat(question(images[0]), max_tokens=10) == alone[images[0]]


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler for the test: a process started in the background by a
    non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, Python then keeps it ignored,
    and interrupt_main() does nothing. An interactive user's Ctrl-C raises KeyboardInterrupt."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_keyboard_interrupt_during_a_call_leaves_the_model_usable(pair, ctrl_c_raises):
    text, mmproj, images = pair
    m = cmx.Model(text, mmproj=mmproj, n_ctx=1024, n_threads=1, sparsity=cmx.Sparsity(budget=30))
    want = m.chat(question(images[0]), max_tokens=8)
    interrupted = 0
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1):
        m.reset()
        timer = threading.Timer(delay, _thread.interrupt_main)
        try:
            timer.start()
            m.chat(question(images[1]), max_tokens=64)
            timer.join()
            time.sleep(0.2)  # an interrupt that came after the call lands here, inside the try
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
        # a follow-up in the same conversation and a fresh one both answer as a fresh model would
        assert m.chat(question(images[0]), max_tokens=8) == want
    assert interrupted >= 1


def test_interrupt_right_after_a_free_does_not_free_twice():
    """A KeyboardInterrupt can be raised as soon as any call returns: one landing between
    mtmd_input_chunks_free and the pointer's reset made Prompt.__del__ free the chunk list again
    (a crash found by tools/sanitize.sh in the test above)."""
    from cmx.vision import Prompt

    class Mtmd:
        freed = []

        def mtmd_input_chunks_free(self, ptr):
            self.freed.append(ptr)
            if len(self.freed) == 1:
                raise KeyboardInterrupt  # as if Ctrl-C landed right after the free returned

    prompt = Prompt(Mtmd(), 1234, [])
    with pytest.raises(KeyboardInterrupt):
        prompt.close()
    prompt.close()  # what __del__ does
    assert Mtmd.freed == [1234]
