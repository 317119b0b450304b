"""Converters on real files written at test time (demo photo crops): each input form gives the
right splits, counts, labels and pixels; output is deterministic and resumable; verify catches
damage."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.cli import main as prep
from data_prep.tfrecord import crc32c, parse_example, read_record, record_offsets
from flowscale.config import DataConfig
from flowscale.data import demo_images, eval_split

from helpers import write_tfrecord


@pytest.fixture(scope="module")
def photos():
    """40 real 32x32 RGB crops, uint8 [N, 32, 32, 3]."""
    return demo_images("train", 40, 32, seed=5).permute(0, 2, 3, 1).numpy()


def box(x: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(x).resize((size, size), Image.BOX))


def read_split(split_dir: Path, size: int, channels: int = 3) -> tuple[dict, dict, dict]:
    """(manifest, {key: HWC pixels}, {key: label}) read back through the loader's eval path."""
    m = json.loads((split_dir / "manifest.json").read_text())
    cfg = DataConfig(dataset="shards", train_manifest=str(split_dir), test_manifest=str(split_dir), image_size=size,
                     channels=channels)
    ev = eval_split(cfg, "train")
    pixels, labels = {}, {}
    keys = []
    for e in m["shards"]:  # keys in stored order, from the tar member names
        import tarfile
        with tarfile.open(split_dir / e["name"]) as tf:
            names = [n.split(".")[0] for n in tf.getnames()]
        keys.extend(dict.fromkeys(names))
    xs, ys = [], []
    for _, x, y in ev.batches(16):
        xs.append(x)
        ys.extend([None] * len(x) if y is None else y.tolist())
    x = torch.cat(xs).permute(0, 2, 3, 1).numpy()
    assert len(keys) == len(x) == m["num_samples"]
    for k, img, lab in zip(keys, x, ys):
        pixels[k], labels[k] = img, lab
    return m, pixels, labels


def test_celebahq_folder_png_jpg_npy(tmp_path, photos):
    src = tmp_path / "celebahq"
    src.mkdir()
    want = {}
    for i in range(12):
        x = photos[i]
        if i % 3 == 0:
            Image.fromarray(x).save(src / f"{i:05d}.png")
        elif i % 3 == 1:
            np.save(src / f"imgHQ{i:05d}.npy", x.transpose(2, 0, 1)[None])  # [1, 3, H, W] as the rebuild tools write
        else:
            Image.fromarray(x).save(src / f"{i:05d}.jpg", quality=95)
            x = np.asarray(Image.open(src / f"{i:05d}.jpg").convert("RGB"))
        want[f"celebahq{i:05d}"] = box(x, 16)
    assert prep(["celebahq", str(src), str(tmp_path / "out"), "--resolution", "16", "--train-count", "9",
                 "--samples-per-shard", "4", "--workers", "2", "--no-progress"]) == 0
    train, px, _ = read_split(tmp_path / "out" / "train", 16)
    assert train["num_samples"] == 9 and [s["count"] for s in train["shards"]] == [4, 4, 1]
    assert train["variant"] == "celebahq" and "first 9" in train["split_rule"]
    assert list(px) == [f"celebahq{i:05d}" for i in range(9)]  # index order
    test, px_test, _ = read_split(tmp_path / "out" / "test", 16)
    assert list(px_test) == [f"celebahq{i:05d}" for i in range(9, 12)]
    for k, x in {**px, **px_test}.items():
        np.testing.assert_array_equal(x, want[k])
    names = sorted(p.name for p in (tmp_path / "out" / "train").glob("*.tar"))
    assert names == [f"celebahq-train-{i:06d}.tar" for i in range(3)]


def test_deterministic_and_resumable(tmp_path, photos):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(10):
        Image.fromarray(photos[i]).save(src / f"{i:03d}.png")
    common = ["--samples-per-shard", "3", "--no-progress", "--encoding", "png"]
    assert prep(["folder", str(src), str(tmp_path / "a"), "--workers", "2", *common]) == 0
    assert prep(["folder", str(src), str(tmp_path / "b"), "--workers", "1", *common]) == 0

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b") and sum(str(p).endswith(".tar") for p in a) == 4
    # Interrupted run: one shard and its record gone, another half-written temp file left over.
    (tmp_path / "b" / "train" / "images-train-000002.tar").unlink()
    (tmp_path / "b" / "train" / ".images-train-000002.tar.json").unlink()
    (tmp_path / "b" / "train" / "manifest.json").unlink()
    before = (tmp_path / "b" / "train" / "images-train-000000.tar").stat().st_mtime_ns
    assert prep(["folder", str(src), str(tmp_path / "b"), "--workers", "1", *common]) == 0
    assert (tmp_path / "b" / "train" / "images-train-000000.tar").stat().st_mtime_ns == before  # skipped
    assert files(tmp_path / "b") == a
    # Same directory, other options: refused instead of mixing two conversions.
    assert prep(["folder", str(src), str(tmp_path / "b"), "--resolution", "16", *common]) == 1


def test_glow_tfrecords(tmp_path, photos):
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    root = tmp_path / "celeba-tfr"
    for split, idx in (("train", range(0, 6)), ("validation", range(6, 9))):
        (root / split).mkdir(parents=True)
        write_tfrecord(root / split / f"{split}-r05-s-0000-of-0001.tfrecords",
                       [{"shape": [32, 32, 3], "data": photos[i].tobytes(), "label": [0]} for i in idx])
    path = root / "train" / "train-r05-s-0000-of-0001.tfrecords"
    offsets = record_offsets(path)
    assert len(offsets) == 6
    ex = parse_example(read_record(path, *offsets[0], check_data=True))
    assert ex["shape"] == [32, 32, 3] and ex["label"] == [0]
    assert prep(["celebahq", str(root), str(tmp_path / "out"), "--resolution", "16", "--no-progress"]) == 0
    train, px, _ = read_split(tmp_path / "out" / "train", 16)
    test, px_test, _ = read_split(tmp_path / "out" / "test", 16)
    assert train["num_samples"] == 6 and test["num_samples"] == 3 and train["source"]["form"] == "glow tfrecords"
    for i, x in enumerate(list(px.values()) + list(px_test.values())):
        np.testing.assert_array_equal(x, box(photos[i], 16))


def test_imagenet_oord_png_folders(tmp_path, photos):
    src = tmp_path / "imagenet32"
    for name, idx in (("train_16x16", range(0, 10)), ("valid_16x16", range(10, 14))):
        (src / name).mkdir(parents=True)
        for i in idx:
            Image.fromarray(box(photos[i], 16)).save(src / name / f"{i:07d}.png")
    assert prep(["imagenet-oord", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    train, px, labels = read_split(tmp_path / "out" / "train", 16)
    test, px_test, _ = read_split(tmp_path / "out" / "test", 16)
    assert train["variant"] == test["variant"] == "oord2016" and not train["labels"]
    assert train["encoding"] == "npy" and "not comparable" not in train["split_rule"]
    assert "comparable only within one variant" in train["source"]["note"]
    assert sorted(px) == [f"{i:07d}" for i in range(10)] and list(px) != sorted(px)  # shuffled train order
    for k, x in {**px, **px_test}.items():
        np.testing.assert_array_equal(x, box(photos[int(k)], 16))


def test_imagenet_chrabaszcz_batches(tmp_path, photos):
    src = tmp_path / "Imagenet16"
    src.mkdir()
    small = np.stack([box(p, 16) for p in photos[:14]])
    rows = small.transpose(0, 3, 1, 2).reshape(14, -1)  # channel-planar rows
    labels = [(i * 7) % 1000 + 1 for i in range(14)]  # 1-based as in the files
    for b, sl in ((1, slice(0, 5)), (2, slice(5, 10))):
        with open(src / f"train_data_batch_{b}", "wb") as f:
            pickle.dump({"data": rows[sl], "labels": labels[sl], "mean": rows.mean(0)}, f)
    np.savez(src / "val_data.npz", data=rows[10:], labels=np.array(labels[10:]))
    assert prep(["imagenet-batches", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    train, px, lab = read_split(tmp_path / "out" / "train", 16)
    test, px_test, lab_test = read_split(tmp_path / "out" / "test", 16)
    assert train["variant"] == "chrabaszcz2017" and train["labels"] and train["num_samples"] == 10
    got = list(px.values()) + list(px_test.values())
    got_labels = list(lab.values()) + list(lab_test.values())
    for i in range(14):
        np.testing.assert_array_equal(got[i], small[i])
        assert got_labels[i] == labels[i] - 1


def test_ilsvrc_tree_decoded_by_content(tmp_path, photos):
    src = tmp_path / "ILSVRC2012"
    wnids = ["n01440764", "n01443537"]
    for c, w in enumerate(wnids):
        (src / "train" / w).mkdir(parents=True)
        for i in range(4):
            img = Image.fromarray(photos[4 * c + i]).resize((40, 32))  # not square: center crop
            img.save(src / "train" / w / f"{w}_{i}.JPEG", format="JPEG", quality=95)
    Image.fromarray(photos[20]).save(src / "train" / wnids[0] / f"{wnids[0]}_png.JPEG", format="PNG")
    Image.fromarray(photos[21]).convert("CMYK").save(src / "train" / wnids[1] / f"{wnids[1]}_cmyk.JPEG", format="JPEG")
    Image.fromarray(photos[22]).convert("L").save(src / "train" / wnids[1] / f"{wnids[1]}_gray.JPEG", format="JPEG")
    (src / "val").mkdir()
    for i in range(3):
        Image.fromarray(photos[30 + i]).save(src / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", format="JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{wnids[i % 2]} 1 2 3 4\n" for i in range(3)))
    assert prep(["ilsvrc", str(src), str(tmp_path / "out"), "--resolution", "16", "--no-progress",
                 "--val-labels", str(tmp_path / "LOC_val_solution.csv")]) == 0
    train, px, lab = read_split(tmp_path / "out" / "train", 16)
    assert train["num_samples"] == 11 and train["classes"] == wnids and train["num_classes"] == 2
    conv = train["source"]["conversions"]
    assert conv == {"CMYK->RGB": 1, "L->RGB": 1, "PNG named .jpeg": 1}
    assert lab["n01440764_png"] == 0 and lab["n01443537_cmyk"] == 1
    np.testing.assert_array_equal(px["n01440764_png"], box(photos[20], 16))
    decoded = np.asarray(Image.open(src / "train" / wnids[0] / f"{wnids[0]}_1.JPEG").convert("RGB"))
    np.testing.assert_array_equal(px["n01440764_1"], box(decoded[:, 4:36], 16))  # center 32x32 of 40x32
    test, _, lab_test = read_split(tmp_path / "out" / "test", 16)
    assert list(lab_test.values()) == [0, 1, 0]


def test_folder_with_class_subfolders(tmp_path, photos):
    for c in ("cat", "dog"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(photos[i + (3 if c == "dog" else 0)]).save(tmp_path / "src" / c / f"{i}.png")
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--split", "test", "--no-shuffle",
                 "--no-progress"]) == 0
    m, px, lab = read_split(tmp_path / "out" / "test", 32)
    assert m["classes"] == ["cat", "dog"] and list(lab.values()) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(px["dog_2"], photos[5])


def test_folder_channels(tmp_path, photos):
    """Grayscale folders stay 1 channel (16-bit scaled to 8, noted); --channels converts either
    way, every conversion counted in the manifest; an RGB folder with a grayscale photo stays RGB."""
    gray = [np.asarray(Image.fromarray(x).convert("L")) for x in photos[:4]]
    (tmp_path / "g").mkdir()
    for i, x in enumerate(gray[:3]):
        Image.fromarray(x).save(tmp_path / "g" / f"{i}.png")
    Image.fromarray(gray[3].astype(np.uint16) * 257).save(tmp_path / "g" / "3.png")  # 16-bit grayscale PNG
    assert Image.open(tmp_path / "g" / "3.png").mode.startswith("I")
    assert prep(["folder", str(tmp_path / "g"), str(tmp_path / "g1"), "--no-shuffle", "--no-progress"]) == 0
    m, px, _ = read_split(tmp_path / "g1" / "train", 32, channels=1)
    assert m["channels"] == 1 and m["source"]["conversions"] == {"I;16->8bit": 1} and "auto: 1" in m["source"]["channels"]
    for i in range(4):
        np.testing.assert_array_equal(px[str(i)][:, :, 0], gray[i])
    assert prep(["folder", str(tmp_path / "g"), str(tmp_path / "g3"), "--channels", "3", "--no-progress"]) == 0
    m, px, _ = read_split(tmp_path / "g3" / "train", 32)
    assert m["channels"] == 3 and m["source"]["conversions"]["L->RGB"] == 4
    np.testing.assert_array_equal(px["0"], np.repeat(gray[0][:, :, None], 3, axis=2))
    (tmp_path / "c").mkdir()
    Image.fromarray(photos[0]).save(tmp_path / "c" / "0.png")
    Image.fromarray(gray[1]).save(tmp_path / "c" / "1.png")
    assert prep(["folder", str(tmp_path / "c"), str(tmp_path / "c3"), "--no-progress"]) == 0
    assert prep(["folder", str(tmp_path / "c"), str(tmp_path / "c1"), "--channels", "1", "--no-progress"]) == 0
    m3, m1 = (json.loads((tmp_path / d / "train" / "manifest.json").read_text()) for d in ("c3", "c1"))
    assert (m3["channels"], m3["source"]["conversions"]) == (3, {"L->RGB": 1})
    assert (m1["channels"], m1["source"]["conversions"]) == (1, {"RGB->L": 1})


def test_bad_input_is_named_or_counted(tmp_path, photos):
    (tmp_path / "src").mkdir()
    for i in range(4):
        Image.fromarray(photos[i]).save(tmp_path / "src" / f"{i}.png")
    (tmp_path / "src" / "9.png").write_bytes(b"not a png")
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "a"), "--no-progress", "--workers", "1"]) == 1
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "b"), "--no-progress", "--bad-input", "skip"]) == 0
    m = json.loads((tmp_path / "b" / "train" / "manifest.json").read_text())
    assert m["num_samples"] == 4 and m["source"]["skipped_inputs"] == 1 and "9.png" in m["source"]["skipped_examples"][0]


def test_verify(tmp_path, photos, capsys):
    (tmp_path / "src").mkdir()
    for i in range(8):
        Image.fromarray(photos[i]).save(tmp_path / "src" / f"{i}.png")
    prep(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--samples-per-shard", "3", "--no-progress"])
    assert prep(["verify", str(tmp_path / "out"), "--no-progress"]) == 0
    shard = tmp_path / "out" / "train" / "images-train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[raw.find(b"\x93NUMPY") + 200] ^= 0xFF  # one pixel changed: decodes fine, checksum does not
    shard.write_bytes(bytes(raw))
    (tmp_path / "out" / "train" / "images-train-000002.tar").unlink()
    capsys.readouterr()
    assert prep(["verify", str(tmp_path / "out"), "--no-progress", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "images-train-000001.tar: sha256 differs" in out and "images-train-000002.tar: missing" in out


@pytest.mark.parametrize("size,expected", [(256, "npy"), (320, "png")])
def test_auto_encoding_is_raw_up_to_256_px(tmp_path, size, expected):
    # raw up to 256 px (CelebA-HQ 256: ~50x cheaper to decode for 1.5x the disk), PNG above
    x = demo_images("train", 2, 256, seed=0).permute(0, 2, 3, 1).numpy()
    (tmp_path / "src").mkdir()
    for i in range(2):
        Image.fromarray(x[i]).resize((size, size)).save(tmp_path / "src" / f"{i}.png")
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress", "--workers", "1"]) == 0
    m = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert m["encoding"] == expected and m["resolution"] == size
    m2, px, _ = read_split(tmp_path / "out" / "train", size)
    assert len(px) == 2 and all(v.shape == (size, size, 3) for v in px.values())


def test_help_states_the_auto_encoding_threshold(capsys):
    from flowscale.data.codec import RAW_UP_TO

    with pytest.raises(SystemExit):
        prep(["folder", "--help"])
    assert f"auto = npy (raw, fastest to decode) for images of at most {RAW_UP_TO} px per side" in " ".join(capsys.readouterr().out.split())
