"""Shards, preparation and the loader: round trip, an independent reader, partitioning, resume, bad input."""

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from moetrain.data import DataLoader, PackedSamples
from moetrain.data.dataset import TokenDataset
from moetrain.data.indexed import IndexedShard, ShardError, ShardWriter
from moetrain.data.prepare import prepare_documents


def _texts(n=200, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "expert", "router", "latent", "token", "shard", "résumé"]
    return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(3, 40))) for i in range(n)]


def _read_megatron_idx(path):
    """An independent reader of Megatron's documented .idx header (not moetrain's code)."""
    data = open(path, "rb").read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack("<Q", data[9:17])
    code = data[17]
    n_seq, n_doc = struct.unpack("<QQ", data[18:34])
    off = 34
    lengths = np.frombuffer(data, np.int32, n_seq, off)
    off += 4 * n_seq
    pointers = np.frombuffer(data, np.int64, n_seq, off)
    off += 8 * n_seq
    docs = np.frombuffer(data, np.int64, n_doc, off)
    dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
             8: np.uint16}[code]
    return version, dtype, lengths, pointers, docs


def test_round_trip_and_independent_reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 129_280, rng.integers(1, 50)) for _ in range(30)]
    w = ShardWriter(tmp_path / "s", np.int32)
    for d in docs:
        w.add_document(d)
    w.finalize()
    shard = IndexedShard(tmp_path / "s")
    assert [shard.document(i).tolist() for i in range(len(shard))] == [d.tolist() for d in docs]
    version, dtype, lengths, pointers, doc_index = _read_megatron_idx(tmp_path / "s.idx")
    assert version == 1 and dtype == np.int32 and doc_index.tolist() == list(range(31))
    raw = np.fromfile(tmp_path / "s.bin", dtype=dtype)
    for d, n, p in zip(docs, lengths, pointers):
        assert raw[p // 4: p // 4 + n].tolist() == d.tolist()


def test_prepare_cli_jsonl_with_workers_and_resume(tmp_path):
    texts = _texts()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-m", "moetrain", "prepare-data", str(src), "--output", str(out),
                           "--workers", "2", "--shard-tokens", "2000"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds = TokenDataset(str(out))
    assert len(ds.manifest.shards) > 2
    assert _decode_documents(ds) == texts

    # An interrupted run (the input dies half way) continues without duplicating or losing documents.
    out2, texts = tmp_path / "ds2", _texts(600, seed=1)

    def dying(n):
        for i, t in enumerate(texts):
            if i == n:
                raise KeyboardInterrupt
            yield t

    with pytest.raises(KeyboardInterrupt):
        prepare_documents(dying(450), out2, shard_tokens=2000, progress=False)
    partial = json.loads((out2 / "progress.json").read_text())
    assert 0 < partial["documents"] < 450 and not partial["done"]
    prepare_documents(iter(texts), out2, shard_tokens=2000, progress=False)
    assert _decode_documents(TokenDataset(str(out2))) == texts


def _decode_documents(ds):
    from moetrain.data.tokenizer import ByteTokenizer

    tokens = ds[0:len(ds)]
    ends = np.flatnonzero(tokens == ds.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ByteTokenizer().decode(tokens[s:e]) for s, e in zip(starts, ends)]


def test_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[EOS]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(["doc", "alpha", "beta", "gamma"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]"}))
    m = prepare_documents(["alpha beta", "gamma zeta alpha"], tmp_path / "ds", str(tmp_path / "tok"), progress=False)
    assert m.eos_id == 0 and m.vocab_size == 6 and m.dtype == "uint16"
    assert TokenDataset(str(tmp_path / "ds"))[0:9].tolist() == [3, 4, 0, 5, 1, 3, 0]


def _dataset(tmp_path, n_docs=300):
    prepare_documents(_texts(n_docs), tmp_path / "ds", shard_tokens=3000, progress=False)
    return TokenDataset(str(tmp_path / "ds"))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_epoch_partition_disjoint_complete_and_layout_independent(tmp_path, dp):
    samples = PackedSamples(_dataset(tmp_path), 32, 256)
    n = len(samples)
    gb = 8
    seen = {r: [] for r in range(dp)}
    for rank in range(dp):
        loader = DataLoader([samples], [(0, n)], [1.0], seed=7, dp_rank=rank, dp_size=dp, micro_batch_size=2,
                            prefetch=False)
        for _ in range(n // gb):
            for b in loader.next_step(gb):
                seen[rank] += [tuple(row) for row in b.tokens.tolist()]
    flat = [row for r in range(dp) for row in seen[r]]
    assert len(flat) == len(set(flat)) == n // gb * gb
    single = DataLoader([samples], [(0, n)], [1.0], seed=7, dp_rank=0, dp_size=1, micro_batch_size=8, prefetch=False)
    ordered = [tuple(row) for _ in range(n // gb) for b in single.next_step(gb) for row in b.tokens.tolist()]
    assert sorted(flat) == sorted(ordered)
    # Each step's global batch is the same set of samples whatever dp is.
    assert {row for r in range(dp) for row in seen[r][:gb // dp]} == set(ordered[:gb])


@pytest.mark.parametrize("dp_after", [1, 2])
def test_resume_is_exact_with_same_or_other_dp(tmp_path, dp_after):
    samples = PackedSamples(_dataset(tmp_path), 32, 256)
    n = len(samples)

    def loaders(dp):
        return [DataLoader([samples], [(0, n)], [1.0], seed=3, dp_rank=r, dp_size=dp, micro_batch_size=2)
                for r in range(dp)]

    def step_rows(ls, gb=8):
        return [row for ld in ls for b in ld.next_step(gb) for row in b.tokens.tolist()]

    straight = loaders(2)
    expected = [step_rows(straight) for _ in range(12)]  # crosses an epoch boundary
    first = loaders(2)
    got = [step_rows(first) for _ in range(5)]
    state = first[0].state_dict()
    resumed = loaders(dp_after)
    for ld in resumed:
        ld.load_state_dict(json.loads(json.dumps(state)))
    got += [step_rows(resumed) for _ in range(7)]
    assert got == expected


def test_blend_follows_weights_and_is_deterministic(tmp_path):
    a = PackedSamples(np.zeros(40_000, np.int64), 16, None, "a")
    b = PackedSamples(np.ones(40_000, np.int64), 16, None, "b")
    loader = DataLoader([a, b], [(0, len(a)), (0, len(b))], [0.75, 0.25], seed=0, dp_rank=0, dp_size=1,
                        micro_batch_size=64, prefetch=False)
    rows = np.concatenate([mb.tokens[:, 0].numpy() for _ in range(16) for mb in loader.next_step(256)])
    assert abs((rows == 0).mean() - 0.75) < 0.01
    again = DataLoader([a, b], [(0, len(a)), (0, len(b))], [0.75, 0.25], seed=0, dp_rank=0, dp_size=1,
                       micro_batch_size=64, prefetch=False)
    assert np.array_equal(np.concatenate([mb.tokens[:, 0].numpy() for mb in again.next_step(256)]), rows[:256])


def test_prefetch_returns_the_same_batches(tmp_path):
    samples = PackedSamples(_dataset(tmp_path), 32, 256)
    plain = DataLoader([samples], [(0, len(samples))], [1.0], 1, 0, 1, 4, prefetch=False)
    ahead = DataLoader([samples], [(0, len(samples))], [1.0], 1, 0, 1, 4, prefetch=True)
    for _ in range(5):
        want = plain.next_step(8)
        got = ahead.next_step(8)
        ahead.prefetch(8)
        assert all((x.tokens == y.tokens).all() for x, y in zip(want, got))


def test_fsspec_url_is_cached_locally_and_reads_the_same(tmp_path):
    local = _dataset(tmp_path)
    remote = TokenDataset(f"file://{tmp_path / 'ds'}", cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(remote[0:len(remote)], local[0:len(local)])
    cached = list((tmp_path / "cache").rglob("shard_*.bin"))
    assert len(cached) == len(local.manifest.shards)


def _expect_error(tmp_path, match):
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    with pytest.raises((ShardError, FileNotFoundError)) as e:
        ds = TokenDataset(str(tmp_path / "ds"), model_vocab_size=272)
        ds[0:len(ds)]
    assert match in str(e.value), str(e.value)
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}  # nothing written over


def test_bad_shards_fail_naming_the_file(tmp_path):
    _dataset(tmp_path)
    ds_dir = tmp_path / "ds"
    pristine = tmp_path / "pristine"
    shutil.copytree(ds_dir, pristine)

    def reset():
        shutil.rmtree(ds_dir)
        shutil.copytree(pristine, ds_dir)

    bin_path, idx_path = ds_dir / "shard_00001.bin", ds_dir / "shard_00001.idx"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])  # truncated .bin
    _expect_error(tmp_path, "shard_00001")
    reset()
    idx_path.write_bytes(b"NOTMAGIC!" + idx_path.read_bytes()[9:])
    _expect_error(tmp_path, "shard_00001.idx")
    reset()
    raw = bytearray(idx_path.read_bytes())
    raw[9:17] = struct.pack("<Q", 7)
    idx_path.write_bytes(bytes(raw))
    _expect_error(tmp_path, "version 7")
    reset()
    raw = bytearray(idx_path.read_bytes())  # the last document's offset points past the end of .bin
    n_seq = struct.unpack("<Q", raw[18:26])[0]
    ptr_off = 34 + 4 * n_seq + 8 * (n_seq - 1)
    raw[ptr_off:ptr_off + 8] = struct.pack("<q", 10 ** 9)
    idx_path.write_bytes(bytes(raw))
    _expect_error(tmp_path, "past the end")
    reset()
    data = bytearray(bin_path.read_bytes())
    data[0] ^= 1
    bin_path.write_bytes(bytes(data))
    _expect_error(tmp_path, "checksum mismatch")
    reset()
    with pytest.raises(ShardError, match="larger than model.vocab_size=100"):
        TokenDataset(str(ds_dir), model_vocab_size=100)


@pytest.mark.parametrize("kind", ["parquet", "saved_dataset", "text"])
def test_prepare_reads_parquet_text_and_saved_datasets(tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    texts = _texts(50)
    if kind == "parquet":
        src = tmp_path / "in.parquet"
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(src))
    elif kind == "saved_dataset":
        src = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(src))
    else:
        src = tmp_path / "in.txt"  # the text format: one document per line
        src.write_text("\n".join(texts) + "\n")
    proc = subprocess.run([sys.executable, "-m", "moetrain", "prepare-data", str(src), "--output", str(tmp_path / "ds"),
                           "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _decode_documents(TokenDataset(str(tmp_path / "ds"))) == texts


def test_prepare_refuses_a_directory_it_did_not_start(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "shard_00000.bin").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="existing"):
        prepare_documents(["a document"], out, progress=False)
    assert (out / "shard_00000.bin").read_bytes() == b"precious"


def test_prepare_bar_has_the_input_bytes_as_total(tmp_path, monkeypatch):
    """On a terminal the bar counts the input's bytes (both files, blank lines too) to its total, across workers."""
    import io
    import re

    from tqdm import tqdm

    from moetrain.data.prepare import main

    class Terminal(io.StringIO):  # what tqdm draws on: stderr, when it is a terminal
        def isatty(self):
            return True

    texts = _texts(600)
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    files[0].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:350]) + "\n")
    files[1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[350:]))
    total = sum(f.stat().st_size for f in files)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main([*map(str, files), "--output", str(tmp_path / "ds"), "--workers", "2"]) == 0
    states = sys.stderr.getvalue().replace("\n", "\r").strip("\r").split("\r")
    size = tqdm.format_sizeof(total, divisor=1000)
    assert len(states) > 3 and all(f"/{size} [" in s for s in states), states  # a total from the start
    assert states[-1].startswith("prepare-data: 100%") and f" {size}/{size} " in states[-1], (states[-1], total)
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", states[-2]), states[-2]  # elapsed<remaining: an ETA
    assert _decode_documents(TokenDataset(str(tmp_path / "ds"))) == texts


def test_two_processes_preparing_the_demo_cache_at_once_both_read_it_whole(tmp_path):
    """Two jobs on one machine start with no demo cache: both prepare-or-wait on it and read the same tokens."""
    code = ("import sys, hashlib, numpy as np\n"
            "from types import SimpleNamespace\n"
            "from moetrain.data import demo_dataset_dir\n"
            "from moetrain.data.dataset import TokenDataset\n"
            "d = TokenDataset(str(demo_dataset_dir(SimpleNamespace(cache_dir=sys.argv[1], demo_bytes=300000))))\n"
            "print(len(d), hashlib.sha256(np.ascontiguousarray(d[0:len(d)]).tobytes()).hexdigest())\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0] and int(outs[0][0].split()[0]) > 50_000
