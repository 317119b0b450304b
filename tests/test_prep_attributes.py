"""Per-image attributes in data prep: CelebA's list_attr format through CelebA-HQ's image list, the
`attr` field of Glow's tfrecords, a CSV for folders; stored as <key>.attr with the names in the
manifest, read back by the latent tools' attribute stream; every bad input refused with one line."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.attributes import CELEBA_ATTRIBUTES
from data_prep.cli import main as prep
from flowscale.data import DataError, demo_images, load_split
from flowscale.data.attributes import attribute_batches

from helpers import write_tfrecord


@pytest.fixture(scope="module")
def photos():
    """8 real 16x16 RGB crops, uint8 [N, 16, 16, 3]."""
    return demo_images("train", 8, 16, seed=7).permute(0, 2, 3, 1).numpy()


def planted(n: int) -> list[str]:
    """A 40-character '0'/'1' string per image (bits of 7i + 3, repeating every 6 columns)."""
    return ["".join("1" if ((i * 7 + 3) >> (k % 6)) & 1 else "0" for k in range(40)) for i in range(n)]


def stored_attributes(split_dir: Path) -> dict[str, str]:
    """{key: .attr text} read straight from the tar members."""
    out = {}
    m = json.loads((split_dir / "manifest.json").read_text())
    for e in m["shards"]:
        with tarfile.open(split_dir / e["name"]) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".attr"):
                    out[member.name.split(".")[0]] = tf.extractfile(member).read().decode()
    return out


def write_list_attr(path: Path, names: list[str], rows: list[tuple[str, str]]) -> None:
    lines = [str(len(rows)), " ".join(names)]
    lines += [f"{f} " + " ".join("1" if b == "1" else "-1" for b in bits) for f, bits in rows]
    path.write_text("\n".join(lines) + "\n")


def test_celebahq_list_attr_through_image_list(tmp_path, photos, capsys):
    src = tmp_path / "celebahq"
    src.mkdir()
    for i in range(6):
        Image.fromarray(photos[i]).save(src / f"{i:05d}.png")
    bits = planted(6)
    # CelebA file names in a different order than the HQ indices: the image list does the mapping.
    orig = {i: f"{100 + 17 * (5 - i):06d}.jpg" for i in range(6)}
    write_list_attr(tmp_path / "list_attr_celeba.txt", list(CELEBA_ATTRIBUTES),
                    [(orig[i], bits[i]) for i in reversed(range(6))] + [("999999.jpg", "0" * 40)])
    (tmp_path / "image_list.txt").write_text("idx orig_idx orig_file proc_md5 final_md5\n" + "".join(
        f"{i} {int(orig[i][:6]) - 1} {orig[i]} aaa bbb\n" for i in range(6)))
    assert prep(["celebahq", str(src), str(tmp_path / "out"), "--train-count", "4", "--no-progress",
                 "--attributes", str(tmp_path / "list_attr_celeba.txt"), "--image-list",
                 str(tmp_path / "image_list.txt")]) == 0
    assert "40 attributes" in capsys.readouterr().out
    for split, idx in (("train", range(4)), ("test", range(4, 6))):
        m = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert m["attributes"] == list(CELEBA_ATTRIBUTES)
        assert stored_attributes(tmp_path / "out" / split) == {f"celebahq{i:05d}": bits[i] for i in idx}
    # The attribute stream of the latent tools: images in stored order with the named attribute.
    split = load_split(str(tmp_path / "out" / "train"))
    got = list(attribute_batches(split, "Smiling", batch_size=3))
    k = CELEBA_ATTRIBUTES.index("Smiling")
    assert [len(x) for x, _, _ in got] == [3, 1] and all(y is None for _, _, y in got)
    assert [h for _, has, _ in got for h in has] == [bits[i][k] == "1" for i in range(4)]
    np.testing.assert_array_equal(got[0][0][1].permute(1, 2, 0).numpy(), photos[1])
    assert len(list(attribute_batches(split, "Young", batch_size=8, max_images=2))[0][0]) == 2
    with pytest.raises(DataError, match=r"'Smile' is not in .*it carries: 5_o_Clock_Shadow, .*Smiling, .*Young"):
        list(attribute_batches(split, "Smile"))


def test_celebahq_rows_named_by_hq_index(tmp_path, photos):
    src = tmp_path / "celebahq"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photos[i]).save(src / f"{i:05d}.png")
    bits = planted(3)
    write_list_attr(tmp_path / "anno.txt", list(CELEBA_ATTRIBUTES), [(f"{i}.jpg", bits[i]) for i in range(3)])
    assert prep(["celebahq", str(src), str(tmp_path / "out"), "--train-count", "2", "--no-progress",
                 "--attributes", str(tmp_path / "anno.txt")]) == 0
    assert stored_attributes(tmp_path / "out" / "test") == {"celebahq00002": bits[2]}


def test_glow_tfrecords_attr_field(tmp_path, photos):
    root = tmp_path / "celeba-tfr"
    bits = planted(5)
    for split, idx in (("train", range(0, 3)), ("validation", range(3, 5))):
        (root / split).mkdir(parents=True)
        # Glow's records: shape, data, label, and attr with CelebA's 40 binary values
        write_tfrecord(root / split / f"{split}-r04-s-0000-of-0001.tfrecords",
                       [{"shape": [16, 16, 3], "data": photos[i].tobytes(), "label": [0],
                         "attr": [int(b) for b in bits[i]]} for i in idx])
    assert prep(["celebahq", str(root), str(tmp_path / "out"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert m["attributes"] == list(CELEBA_ATTRIBUTES)
    assert list(stored_attributes(tmp_path / "out" / "train").values()) == bits[:3]
    assert list(stored_attributes(tmp_path / "out" / "test").values()) == bits[3:]


def test_folder_csv_and_shards_without_attributes(tmp_path, photos, capsys):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png"]
    for i, n in enumerate(names):
        Image.fromarray(photos[i]).save(tmp_path / "src" / n)
    (tmp_path / "attrs.csv").write_text("file,bright,Smiling\na.png,1,no\nb,0,yes\nsub/c.png,true,-1\n")
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "out"), "--no-shuffle", "--no-progress",
                 "--attributes", str(tmp_path / "attrs.csv")]) == 0
    m = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert m["attributes"] == ["bright", "Smiling"]
    assert stored_attributes(tmp_path / "out" / "train") == {"a": "10", "b": "01", "sub_c": "10"}
    capsys.readouterr()
    assert prep(["verify", str(tmp_path / "out"), "--no-progress", "--workers", "1"]) == 0
    # verify decodes the .attr members too: one with a character that is not 0/1 is named
    shard = next((tmp_path / "out" / "train").glob("*.tar"))
    with tarfile.open(shard) as tf:
        at = tf.getmember("b.attr").offset_data
    raw = bytearray(shard.read_bytes())
    raw[at + 1:at + 2] = b"x"
    shard.write_bytes(bytes(raw))
    assert prep(["verify", str(tmp_path / "out"), "--no-progress", "--workers", "1", "--quick"]) == 1
    assert "sample 'b'" in capsys.readouterr().out
    # Without --attributes: no .attr members and an empty list, and the attribute stream refuses.
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "plain"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "plain" / "train" / "manifest.json").read_text())["attributes"] == []
    assert stored_attributes(tmp_path / "plain" / "train") == {}
    with pytest.raises(DataError, match="carries no attributes"):
        list(attribute_batches(load_split(str(tmp_path / "plain" / "train")), "bright"))


def test_attribute_refusals(tmp_path, photos, capsys):
    src = tmp_path / "celebahq"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photos[i]).save(src / f"{i:05d}.png")
    write_list_attr(tmp_path / "anno.txt", list(CELEBA_ATTRIBUTES), [(f"{i}.jpg", planted(2)[i]) for i in range(2)])
    common = ["--train-count", "2", "--no-progress"]

    def refused(argv, *words):
        capsys.readouterr()
        assert prep(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("data_prep: error:"), err
        for w in words:
            assert w in err, (w, err)

    refused(["celebahq", str(src), str(tmp_path / "o1"), *common, "--attributes", str(tmp_path / "anno.txt")],
            "anno.txt", "'2.jpg'", "CelebA-HQ image 2", "--image-list")
    refused(["celebahq", str(src), str(tmp_path / "o2"), *common, "--image-list", str(tmp_path / "anno.txt")],
            "give --attributes too")
    refused(["celebahq", str(src), str(tmp_path / "o3"), *common, "--attributes", str(tmp_path / "nope.txt")],
            "nope.txt does not exist")
    (tmp_path / "short.txt").write_text("1\nSmiling Young\n0.jpg 1\n")
    refused(["celebahq", str(src), str(tmp_path / "o4"), *common, "--attributes", str(tmp_path / "short.txt")],
            "short.txt line 3", "1 values", "2 attributes")
    (tmp_path / "f").mkdir()
    Image.fromarray(photos[0]).save(tmp_path / "f" / "x.png")
    Image.fromarray(photos[1]).save(tmp_path / "f" / "y.png")
    (tmp_path / "bad.csv").write_text("file,bright\nx.png,maybe\ny.png,1\n")
    refused(["folder", str(tmp_path / "f"), str(tmp_path / "o5"), "--no-progress", "--attributes",
             str(tmp_path / "bad.csv")], "bad.csv line 2", "'maybe'", "not binary")
    (tmp_path / "missing.csv").write_text("file,bright\nx.png,1\n")
    refused(["folder", str(tmp_path / "f"), str(tmp_path / "o6"), "--no-progress", "--attributes",
             str(tmp_path / "missing.csv")], "missing.csv", "no row for image y.png")
    tfr = tmp_path / "tfr" / "train"
    tfr.mkdir(parents=True)
    write_tfrecord(tfr / "train-r04-s-0000-of-0001.tfrecords", [{"shape": [16, 16, 3], "data": photos[0].tobytes()}])
    refused(["celebahq", str(tmp_path / "tfr"), str(tmp_path / "o7"), "--no-progress", "--attributes",
             str(tmp_path / "anno.txt")], "tfrecords", "own 'attr' feature")
