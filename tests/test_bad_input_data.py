"""Hostile and broken data: shard names that leave the dataset, re-runs on another input or tokenizer, blends of
different tokenizers, bad input documents, and a fuzz of damaged shards and manifests.

Every check compares with something independent of the code under test: the original token array, the texts
written into the input, the bytes of the output directory before the failing call.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moetrain.config import DataConfig
from moetrain.data import build_sources
from moetrain.data.dataset import MANIFEST, TokenDataset
from moetrain.data.indexed import IndexedShard, ShardError
from moetrain.data.prepare import BadDocumentError, PrepareError, prepare_documents
from moetrain.data.tokenizer import ByteTokenizer

BYTE_VOCAB = ByteTokenizer.vocab_size


def _texts(n, seed=0, tag="doc"):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "expert", "router", "latent", "token", "shard", "résumé"]
    return [f"{tag} {i}: " + " ".join(rng.choice(words, rng.integers(3, 30))) for i in range(n)]


def _decode(ds):
    tokens = ds[0:len(ds)]
    ends = np.flatnonzero(tokens == ds.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ByteTokenizer().decode(tokens[s:e]) for s, e in zip(starts, ends)]


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "moetrain", "prepare-data", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def _one_line_error(proc, *parts):
    """Exit status 2, exactly one line on stderr, no traceback, and the line names every part."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _word_tokenizer(directory, words):
    """A WordLevel tokenizer built here (no download): [EOS]=0, [UNK]=1, then ``words`` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[EOS]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[EOS]"}))
    return directory


# ------------------------------------------------------------------------------------------ 1. shard names
@pytest.mark.parametrize("name", ["../outside/shard_00000", "/etc/passwd", "sub/shard_00000", "a\\b", ".", "..",
                                  "", "shard 0", "shard.0", "~x", 7])
def test_manifest_shard_names_must_be_plain_file_names(tmp_path, name):
    prepare_documents(_texts(40), tmp_path / "ds", shard_tokens=600, progress=False)
    outside = tmp_path / "outside"  # a real shard beside the dataset, that a traversal would read
    outside.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(tmp_path / "ds" / f"shard_00000{suffix}", outside / f"shard_00000{suffix}")
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    manifest["shards"][1]["name"] = name
    (tmp_path / "ds" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as e:
        TokenDataset(str(tmp_path / "ds"), verify_checksums=False)  # refused when the manifest loads
    assert f"{tmp_path / 'ds'}/{MANIFEST}" in str(e.value) and f"shards[1].name {name!r}" in str(e.value)


def test_remote_manifest_cannot_write_outside_the_cache(tmp_path):
    import fsspec

    prepare_documents(_texts(40), tmp_path / "ds", shard_tokens=600, progress=False)
    fs = fsspec.filesystem("memory")
    root = f"/moetrain-test-{os.getpid()}"

    def upload(prefix, manifest):
        for f in (tmp_path / "ds").glob("shard_*"):
            fs.pipe(f"{prefix}/{f.name}", f.read_bytes())
        fs.pipe(f"{prefix}/{MANIFEST}", json.dumps(manifest).encode())

    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    upload(f"{root}/good", manifest)  # the same files under honest names read back whole
    good = TokenDataset(f"memory://{root}/good", cache_dir=str(tmp_path / "cache" / "shards"))
    assert np.array_equal(good[0:len(good)], TokenDataset(str(tmp_path / "ds"))[0:len(good)])

    manifest["shards"][0]["name"] = "../../../escaped"
    fs.pipe(f"{root}/escaped.bin", b"x")
    fs.pipe(f"{root}/escaped.idx", b"x")
    upload(f"{root}/evil", manifest)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ShardError, match=r"evil/manifest.json: shards\[0\].name '../../../escaped'"):
        ds = TokenDataset(f"memory://{root}/evil", cache_dir=str(tmp_path / "cache" / "shards"))
        ds[0:len(ds)]  # (unreached) the fetch that would write <cache>/../../../escaped.idx, inside tmp_path
    after = [p for p in sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) if p not in before]
    assert all(p.parts[:2] == ("cache", "shards") for p in after) and not list(tmp_path.rglob("escaped*"))
    fs.rm(root, recursive=True)


# ------------------------------------------------------------------------ 2. re-runs on another input
def test_rerun_with_other_or_changed_input_is_refused_naming_the_file(tmp_path):
    src, other, out = _jsonl(tmp_path / "in.jsonl", _texts(60)), _jsonl(tmp_path / "other.jsonl", _texts(5, 1)), \
        tmp_path / "ds"
    assert _cli(src, "--output", out, "--workers", 1, "--shard-tokens", 800).returncode == 0
    done = _snapshot(out)
    record = json.loads((out / MANIFEST).read_text())
    assert record["inputs"]["files"] == [{"path": str(src.resolve()), "bytes": src.stat().st_size,
                                          "mtime_ns": src.stat().st_mtime_ns}]
    assert record["tokenizer_fingerprint"] == ByteTokenizer.fingerprint

    _one_line_error(_cli(other, "--output", out), f"{out}/progress.json", str(other.resolve()),
                    "not an input of the earlier run")
    _one_line_error(_cli(src, other, "--output", out), str(other.resolve()))
    _one_line_error(_cli(src, "--output", out, "--text-key", "body"), "text_key was 'text'")
    with src.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    _one_line_error(_cli(src, "--output", out), str(src.resolve()), "changed since the earlier run")
    assert _snapshot(out) == done  # every refusal left the finished dataset as it was
    assert _decode(TokenDataset(str(out))) == _texts(60)


def test_interrupted_run_refuses_another_tokenizer_and_resumes_with_the_same(tmp_path):
    texts, inputs = _texts(400), {"files": [{"path": "corpus", "bytes": 1, "mtime_ns": 2}]}

    def dying(n):
        for i, t in enumerate(texts):
            if i == n:
                raise KeyboardInterrupt
            yield t

    tok = _word_tokenizer(tmp_path / "tok", ["doc", "alpha", "beta", "gamma"])
    with pytest.raises(KeyboardInterrupt):
        prepare_documents(dying(300), tmp_path / "ds", str(tok), shard_tokens=500, progress=False, inputs_id=inputs)
    interrupted = _snapshot(tmp_path / "ds")
    assert not json.loads(interrupted["progress.json"])["done"] and len(interrupted) > 2

    with pytest.raises(PrepareError, match="fingerprint"):  # the byte tokenizer
        prepare_documents(iter(texts), tmp_path / "ds", progress=False, inputs_id=inputs)
    copy = tmp_path / "copy"  # the same tokenizer files elsewhere: the same tokenizer
    shutil.copytree(tok, copy)
    other = _word_tokenizer(tmp_path / "other", ["doc", "beta", "alpha", "gamma"])
    shutil.copy(other / "tokenizer.json", tok / "tokenizer.json")  # same path, other vocabulary: refused
    with pytest.raises(PrepareError, match=f"tokenizer '{tok}' .fingerprint sha256:"):
        prepare_documents(iter(texts), tmp_path / "ds", str(tok), progress=False, inputs_id=inputs)
    with pytest.raises(PrepareError, match="input corpus changed since the earlier run"):
        prepare_documents(iter(texts), tmp_path / "ds", str(copy), progress=False,
                          inputs_id={"files": [{"path": "corpus", "bytes": 1, "mtime_ns": 3}]})
    assert _snapshot(tmp_path / "ds") == interrupted

    m = prepare_documents(iter(texts), tmp_path / "ds", str(copy), shard_tokens=500, progress=False,
                          inputs_id=inputs)
    straight = prepare_documents(iter(texts), tmp_path / "straight", str(copy), shard_tokens=500, progress=False)
    assert np.array_equal(TokenDataset(str(tmp_path / "ds"))[0:], TokenDataset(str(tmp_path / "straight"))[0:])
    assert m.tokenizer_fingerprint == straight.tokenizer_fingerprint and m.inputs == inputs


def test_old_manifest_without_provenance_still_loads(tmp_path):
    prepare_documents(_texts(50), tmp_path / "ds", shard_tokens=800, progress=False)
    record = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    old = {k: record[k] for k in ("tokenizer", "vocab_size", "eos_id", "dtype", "shards", "format")}
    (tmp_path / "ds" / MANIFEST).write_text(json.dumps(old))
    ds = TokenDataset(str(tmp_path / "ds"))
    assert ds.manifest.tokenizer_fingerprint is None and ds.manifest.inputs is None
    assert _decode(ds) == _texts(50)


def test_demo_records_a_stable_input_description(tmp_path):
    from moetrain.data import demo_dataset_dir

    cfg = DataConfig(demo_bytes=10_000, cache_dir=str(tmp_path))
    out = demo_dataset_dir(cfg)
    inputs = TokenDataset(str(out)).manifest.inputs
    assert inputs["bytes"] == 10_000 and inputs["python"] == f"py{sys.version_info.major}.{sys.version_info.minor}"
    first = _snapshot(out)
    progress = json.loads(first["progress.json"])
    (out / "progress.json").write_text(json.dumps({**progress, "done": False}))  # forces a re-run over the same input
    assert demo_dataset_dir(cfg) == out and json.loads((out / "progress.json").read_text())["done"]


# ----------------------------------------------------------------------------------------------- 3. blends
def _blend(paths):
    return build_sources(DataConfig(kind="shards", paths=[str(p) for p in paths], val_fraction=0.0), 8, 512)


def test_blend_refuses_datasets_of_different_tokenizers(tmp_path):
    words = ["doc", "alpha", "beta", "gamma", "delta", "expert", "router", "latent", "token", "shard", "résumé"]
    tok_a = _word_tokenizer(tmp_path / "tok_a", words)
    tok_b = _word_tokenizer(tmp_path / "tok_b", words[::-1])  # same size, same EOS id, other ids
    shutil.copytree(tok_a, tmp_path / "tok_a_copy")
    for name, tok in (("a", tok_a), ("b", tok_b), ("a2", tmp_path / "tok_a_copy")):
        prepare_documents(_texts(30), tmp_path / name, str(tok), shard_tokens=200, progress=False)
    with pytest.raises(ValueError) as e:
        _blend([tmp_path / "a", tmp_path / "b"])
    assert f"{tmp_path / 'a'} and {tmp_path / 'b'}" in str(e.value) and "fingerprints differ" in str(e.value)
    assert len(_blend([tmp_path / "a", tmp_path / "a2"]).samples) == 2  # a copy elsewhere is the same tokenizer

    for name in ("a", "a2"):  # older manifests: no fingerprint, so the names (the two paths) are compared
        record = json.loads((tmp_path / name / MANIFEST).read_text())
        del record["tokenizer_fingerprint"]
        (tmp_path / name / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="has no tokenizer fingerprint .an older manifest., so name and vocab_size"):
        _blend([tmp_path / "a", tmp_path / "a2"])
    with pytest.raises(ValueError, match="fingerprint"):
        _blend([tmp_path / "b", tmp_path / "a"])
    prepare_documents(_texts(30, 1), tmp_path / "bytes1", progress=False)
    prepare_documents(_texts(30, 2), tmp_path / "bytes2", progress=False)
    assert len(_blend([tmp_path / "bytes1", tmp_path / "bytes2"]).samples) == 2


# ------------------------------------------------------------------------------------- 4. bad input documents
def _bad_input(tmp_path, kind):
    """(input file, 1-based line or row text, words the error must hold) for one kind of bad document."""
    good = [json.dumps({"text": t}).encode() for t in _texts(6)]
    bad = {"null": b'{"text": null}', "number": b'{"text": 5}', "utf8": b'{"text": "caf\xe9"}',
           "malformed": b'{"text": "abc"', "not_object": b'["text"]', "no_key": b'{"body": "x"}'}
    if kind in bad:
        src = tmp_path / "in.jsonl"
        src.write_bytes(b"\n".join(good[:3] + [bad[kind]] + good[3:]) + b"\n")
        reason = {"null": "field 'text' is null, not a string", "number": "field 'text' is a number",
                  "utf8": "not UTF-8", "malformed": "malformed JSON", "not_object": "an array, not a JSON object",
                  "no_key": "no field 'text'"}[kind]
        return src, f"{src}:4: {reason}"
    if kind == "text_utf8":
        src = tmp_path / "in.txt"
        src.write_bytes(b"first line\nsecond line\n\xff\xfe third\nfourth\n")
        return src, f"{src}:3: not UTF-8"
    if kind == "parquet_null":
        datasets = pytest.importorskip("datasets")
        src = tmp_path / "in.parquet"
        datasets.Dataset.from_dict({"text": ["a", "b", None, "d"]}).to_parquet(str(src))
        return src, f"{src}: row index 2: field 'text' is null"
    src = tmp_path / "in.jsonl"  # empty
    src.write_bytes(b"")
    return src, f"{src}: empty input file"


@pytest.mark.parametrize("kind", ["null", "number", "utf8", "malformed", "not_object", "no_key", "text_utf8",
                                  "parquet_null", "empty"])
def test_bad_document_fails_naming_file_and_line(tmp_path, kind):
    src, message = _bad_input(tmp_path, kind)
    out = tmp_path / "ds"
    _one_line_error(_cli(src, "--output", out, "--workers", 1), message)
    assert not out.exists()  # made by this run, empty when it failed: removed


def test_skip_counts_and_reports_bad_documents_with_workers(tmp_path):
    texts = _texts(700)
    lines = [json.dumps({"text": t}).encode() for t in texts]
    bad_at = {5: b'{"text": null}', 100: b'{"text": "\xc3\x28"}', 101: b"{oops", 650: b'{"text": 1.5}'}
    for i in sorted(bad_at):
        lines.insert(i, bad_at[i])  # in ascending order: the bad line ends up at line i + 1
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "ds"
    proc = _cli(src, "--output", out, "--workers", 2, "--shard-tokens", 3000, "--on-bad-document", "skip")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipped 4 bad documents (first: {src}:6: field 'text' is null, not a string; {src}:101: not UTF-8" \
        in proc.stdout, proc.stdout
    assert f"{src}:651: field 'text' is a number" in proc.stdout
    ds = TokenDataset(str(out))
    assert _decode(ds) == texts
    assert ds.manifest.skipped_documents == 4 and len(ds.manifest.skipped_examples) == 4
    progress = json.loads((out / "progress.json").read_text())
    assert progress["skipped_documents"] == 4 and progress["documents"] == 704 and progress["done"]


def test_failure_keeps_completed_shards_and_skip_resumes_from_them(tmp_path):
    texts = _texts(500)
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(400, '{"text": ')
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    _one_line_error(_cli(src, "--output", out, "--workers", 1, "--shard-tokens", 3000), f"{src}:401: malformed",
                    "--on-bad-document=skip")
    progress = json.loads((out / "progress.json").read_text())
    assert not progress["done"] and 0 < progress["documents"] <= 400
    assert not list(out.glob("*.tmp"))  # the shard in progress was dropped, completed ones stay
    partial = _decode(TokenDataset(str(out)))
    assert partial == texts[:len(partial)]

    proc = _cli(src, "--output", out, "--workers", 1, "--shard-tokens", 3000, "--on-bad-document", "skip")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _decode(TokenDataset(str(out))) == texts  # resumed: nothing lost or duplicated
    assert f"skipped 1 bad documents (first: {src}:401: malformed JSON" in proc.stdout


def test_python_api_names_non_string_documents(tmp_path):
    with pytest.raises(BadDocumentError, match="document 2: NoneType, not a string"):
        prepare_documents(["first", None, "third"], tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()
    m = prepare_documents(["first", None, "third", 4], tmp_path / "ds", progress=False, on_bad_document="skip")
    assert m.skipped_documents == 2 and m.skipped_examples == ["document 2: NoneType, not a string",
                                                               "document 4: int, not a string"]
    assert _decode(TokenDataset(str(tmp_path / "ds"))) == ["first", "third"]
    with pytest.raises(PrepareError, match="no documents in the input .1 bad documents skipped."):
        prepare_documents([None], tmp_path / "empty", progress=False, on_bad_document="skip")


# ---------------------------------------------------------------------------------------------------- 5. fuzz
_ODD_VALUES = [-1, 0, 1, 3, 2 ** 70, 1.5, "x", "", None, True, [], {}, "../../etc/passwd", "shard_00000", "int32"]


def _mutations(ds_dir, n, seed):
    """``n`` seeded damages: (file name, new bytes, kind); kind is truncate, flip or (manifest) value."""
    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in ds_dir.iterdir() if p.name != "progress.json")
    out = []
    for _ in range(n):
        name = names[rng.integers(len(names))]
        data = bytearray((ds_dir / name).read_bytes())
        kind = ["truncate", "flip", "flip", "value"][rng.integers(4 if name == MANIFEST else 3)]
        if kind == "truncate":  # a quarter at the edges: empty, inside or just past the 34-byte .idx header
            edges = [0, 1, 33, 34, 35, len(data) - 1]
            data = data[:edges[rng.integers(len(edges))] if rng.random() < 0.25 else rng.integers(len(data))]
        elif kind == "flip":  # a third of .idx flips land in the 34-byte header, where each field is checked
            at = rng.integers(34) if name.endswith(".idx") and rng.random() < 1 / 3 else rng.integers(len(data))
            data[at] ^= int(rng.integers(1, 256))
        else:
            data = bytearray(json.dumps(_damage_json(json.loads(data), rng)).encode())
        out.append((name, bytes(data), kind))
    return out


def _damage_json(record, rng):
    """Replace one scalar with an odd value, delete one key, or add an unknown one."""
    places, stack = [], [record]
    while stack:
        node = stack.pop()
        for key in (node if isinstance(node, dict) else range(len(node))):
            if isinstance(node[key], (dict, list)):
                stack.append(node[key])
            places.append((node, key))
    node, key = places[rng.integers(len(places))]
    action = rng.integers(3) if isinstance(node, dict) else 0
    if action == 0 and not isinstance(node[key], (dict, list)):
        node[key] = _ODD_VALUES[rng.integers(len(_ODD_VALUES))]
    elif action == 1:
        del node[key]
    else:
        (node if isinstance(node, dict) else record)["unexpected"] = 1
    return record


def _read_shard(prefix):
    shard = IndexedShard(prefix)
    return [shard.document(i).tolist() for i in range(len(shard))]


def test_fuzz_shard_reader(tmp_path):
    """Damaged .bin/.idx read by IndexedShard alone (no manifest, no checksums): ShardError naming the damaged file,
    or exactly the original documents; a flipped byte inside a .bin may change tokens, never the documents' lengths.
    """
    prepare_documents(_texts(120), tmp_path / "pristine", shard_tokens=1500, progress=False)
    prefixes = sorted({p.stem for p in (tmp_path / "pristine").glob("shard_*")})
    truth = {name: _read_shard(tmp_path / "pristine" / name) for name in prefixes}
    case_dir = tmp_path / "case"
    shutil.copytree(tmp_path / "pristine", case_dir)
    outcomes = {"error": 0, "exact": 0, "changed": 0}
    for i, (name, data, kind) in enumerate(_mutations(tmp_path / "pristine", 400, seed=5)):
        if name == MANIFEST:
            continue
        (case_dir / (name + ".new")).write_bytes(data)
        os.replace(case_dir / (name + ".new"), case_dir / name)
        prefix = name.split(".")[0]
        try:
            docs = _read_shard(case_dir / prefix)
        except ShardError as e:
            assert str(case_dir / prefix) in str(e) and name in str(e), (i, name, kind, str(e))
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 - any other type fails the test, with the case that caused it
            pytest.fail(f"case {i} ({kind} of {name}): {type(e).__name__}: {e}")
        else:
            if docs == truth[prefix]:
                outcomes["exact"] += 1
            else:
                assert name.endswith(".bin") and kind == "flip", (i, name, kind)
                assert [len(d) for d in docs] == [len(d) for d in truth[prefix]]
                outcomes["changed"] += 1
        (case_dir / name).unlink()
        shutil.copy(tmp_path / "pristine" / name, case_dir / name)
    assert outcomes["error"] > 150 and outcomes["changed"] > 10, outcomes


@pytest.mark.parametrize("verify", [True, False])
def test_fuzz_damaged_shards_and_manifest(tmp_path, verify):
    """Damaged .bin/.idx/manifest.json: reading every token raises ShardError naming a file, or gives the truth.

    Reading goes through ``ds[0:n]`` (all tokens) and ``gather`` (spans across shards). The outcome must be a
    ShardError whose message holds the dataset path and the damaged file's name (manifest.json for the manifest),
    or exactly the original tokens. One exception, with checksums off: a flipped byte inside a .bin legitimately
    changes a token no check can see, so there only the token count and the range [0, vocab_size) are required;
    with checksums on, the tokens must be exactly right or the error raised.
    """
    prepare_documents(_texts(120), tmp_path / "pristine", shard_tokens=1500, progress=False)
    truth = TokenDataset(str(tmp_path / "pristine"))[0:]
    starts = np.arange(0, len(truth) - 64, 37)
    case_dir = tmp_path / "case"
    shutil.copytree(tmp_path / "pristine", case_dir)
    assert np.array_equal(TokenDataset(str(case_dir), verify_checksums=verify)[0:], truth)  # the control
    outcomes = {"error": 0, "exact": 0, "changed": 0}
    for i, (name, data, kind) in enumerate(_mutations(tmp_path / "pristine", 300, seed=11)):
        # written as a new file and renamed over: a memory map of an earlier case's file stays valid
        (case_dir / (name + ".new")).write_bytes(data)
        os.replace(case_dir / (name + ".new"), case_dir / name)
        try:
            ds = TokenDataset(str(case_dir), model_vocab_size=BYTE_VOCAB, verify_checksums=verify)
            got, rows = ds[0:len(ds)], ds.gather(starts, 64)
        except ShardError as e:
            where = MANIFEST if name == MANIFEST else name
            assert str(case_dir) in str(e) and where in str(e), (i, name, kind, str(e))
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 - any other type fails the test, with the case that caused it
            pytest.fail(f"case {i} ({kind} of {name}): {type(e).__name__}: {e}")
        else:
            if np.array_equal(got, truth) and np.array_equal(rows, truth[starts[:, None] + np.arange(64)]):
                outcomes["exact"] += 1
            else:
                assert not verify and name.endswith(".bin") and kind == "flip", (i, name, kind)
                assert len(got) == len(truth) and got.max() < BYTE_VOCAB and rows.shape == (len(starts), 64)
                outcomes["changed"] += 1
        (case_dir / name).unlink()
        shutil.copy(tmp_path / "pristine" / name, case_dir / name)
    assert outcomes["error"] > 150 and (verify or outcomes["changed"] > 10), outcomes  # varied enough damage
