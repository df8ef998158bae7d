#!/usr/bin/env python3
"""Generate motley's bundled multimodal sample corpus (data/sample/).

Every byte comes from a registry package, never from a download at run time:
  * images:  scikit-learn's bundled 8x8 handwritten digits (load_digits),
  * speech:  captions spoken by Debian's espeak-ng, FLAC by Debian's flac,
  * text:    King James Bible (Debian bible-kjv-text) and Ambrose Bierce's
             Devil's Dictionary (Debian dict-devil), both public domain.

Run it through generate.sh, which installs the Debian packages and a pinned
private venv. Output is byte-for-byte reproducible: every random choice uses
a hand-written splitmix64, audio is resampled with integer-only arithmetic,
FLAC uses fixed (integer) predictors only, and tool versions are checked
against the pins below before anything is written.

Usage:
  generate.py [--out DIR]      regenerate into DIR (default: this directory)
  generate.py --check          regenerate into a temp dir and compare with the
                               committed files and SHA256SUMS (exit 1 on diff)
  --allow-drift                proceed even if a tool version differs from its pin
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
import PIL
import sklearn
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent

# Exact versions the committed files were produced with.
PINNED_DEBIAN = {
    "espeak-ng": "1.51+dfsg-10+deb12u2",
    "espeak-ng-data": "1.51+dfsg-10+deb12u2",
    "libespeak-ng1": "1.51+dfsg-10+deb12u2",
    "flac": "1.4.2+ds-2",
    "libflac12": "1.4.2+ds-2",
    "bible-kjv": "4.38",
    "bible-kjv-text": "4.38",
    "dict-devil": "1.0-13.1",
}
PINNED_PY = {"numpy": "2.3.5", "pillow": "11.3.0", "scikit-learn": "1.7.2"}

# Generated outputs (README.md, generate.*, requirements.txt are hand-written).
GENERATED_DIRS = ("images", "speech", "text")
GENERATED_FILES = ("images.jsonl", "speech.jsonl", "interleaved.jsonl", "SHA256SUMS")

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

IMAGE_CAPTIONS = [
    "a handwritten digit {w}",
    "the number {n} written by hand",
    "a small scan of a handwritten {w}",
    "the digit {w}, drawn by hand",
    "handwritten number {w} ({n})",
]

SPEECH_TRANSCRIPTS = [
    "{w}",
    "the number {w}",
    "a handwritten digit {w}",
    "here is {a} {w}",
]

# (tag, espeak-ng voice, words per minute, pitch 0-99)
VOICES = [("us", "en-us", 165, 50), ("gb", "en-gb+f3", 150, 60), ("sc", "en-gb-scotland+m3", 180, 40)]

# Clips also written as FLAC with identical samples: template 1, voice "us".
BOTH_FORMATS_TEMPLATE, BOTH_FORMATS_VOICE = 1, "us"

N_INTERLEAVED = 300
TEST_EVERY = 10  # images whose index % 10 == 9 are the held-out "test" split

# Books of the KJV kept (abbreviation as printed by `bible`, full name).
KJV_BOOKS = [
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"), ("Eccl", "Ecclesiastes"),
    ("SSol", "Song of Solomon"), ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"),
    ("John", "John"), ("Acts", "Acts"),
]

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Stateless 64-bit mixer: the only source of 'randomness' (stable forever)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class Rng:
    def __init__(self, seed: int):
        self.state = seed & MASK64

    def below(self, n: int) -> int:
        self.state = (self.state + 1) & MASK64
        return splitmix64(self.state) % n

    def pick(self, seq):
        return seq[self.below(len(seq))]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": kw.pop("home", "/nonexistent")}
    return subprocess.run(cmd, check=True, capture_output=True, env=env, **kw)


def check_versions(allow_drift: bool) -> None:
    problems = []
    for pkg, want in PINNED_DEBIAN.items():
        try:
            got = run(["dpkg-query", "-W", "-f=${Version}", pkg]).stdout.decode().strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            got = "(not installed)"
        if got != want:
            problems.append(f"Debian {pkg}: pinned {want}, found {got}")
    have = {"numpy": np.__version__, "pillow": PIL.__version__, "scikit-learn": sklearn.__version__}
    for pkg, want in PINNED_PY.items():
        if have[pkg] != want:
            problems.append(f"PyPI {pkg}: pinned {want}, found {have[pkg]}")
    if problems:
        msg = "version drift:\n  " + "\n  ".join(problems)
        if not allow_drift:
            sys.exit(msg + "\n(output would not match SHA256SUMS; use generate.sh, or --allow-drift)")
        print("warning: " + msg, file=sys.stderr)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


# ---------------------------------------------------------------- images

def make_images(out: Path) -> list[dict]:
    digits = load_digits()
    (out / "images").mkdir(parents=True)
    rows = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        # 0..16 ink levels -> 0..255, then 4x nearest-neighbour upscale to 32x32 (exact integers).
        px = (img.astype(np.int64) * 255 + 8) // 16
        px = np.repeat(np.repeat(px, 4, axis=0), 4, axis=1).astype(np.uint8)
        rel = f"images/{i:05d}.png"
        Image.fromarray(px).save(out / rel, format="PNG", optimize=False, compress_level=9)
        tmpl = IMAGE_CAPTIONS[splitmix64(0x1000 + i) % len(IMAGE_CAPTIONS)]
        caption = tmpl.format(w=WORDS[label], n=label)
        split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
        rows.append({"image": rel, "caption": caption, "label": label, "split": split})
    write_jsonl(out / "images.jsonl", rows)
    return rows


# ---------------------------------------------------------------- speech

def resample_22050_to_16000(x: np.ndarray) -> np.ndarray:
    """Integer-only resampler, so results are identical on every CPU.

    A [1,4,6,4,1]/16 binomial low-pass (attenuates what would alias above 8 kHz),
    then linear interpolation at positions j*441/320 with round-half-up.
    """
    x = x.astype(np.int64)
    p = np.pad(x, 2, mode="edge")
    lp = p[:-4] + 4 * p[1:-3] + 6 * p[2:-2] + 4 * p[3:-1] + p[4:]  # 16x scale
    n_out = (len(x) - 1) * 320 // 441 + 1
    pos = np.arange(n_out, dtype=np.int64) * 441
    idx, frac = pos // 320, pos % 320
    nxt = np.minimum(idx + 1, len(x) - 1)
    y = lp[idx] * (320 - frac) + lp[nxt] * frac  # scale 16*320 = 5120
    y = np.floor_divide(y + 2560, 5120)
    return np.clip(y, -32768, 32767).astype(np.int16)


def trim_silence(x: np.ndarray, rate: int) -> np.ndarray:
    loud = np.nonzero(np.abs(x.astype(np.int64)) > 300)[0]
    if len(loud) == 0:
        raise RuntimeError("espeak-ng produced silence")
    pad = rate * 60 // 1000  # keep 60 ms either side
    return x[max(0, loud[0] - pad): loud[-1] + pad + 1]


def write_wav16k(path: Path, samples: np.ndarray) -> None:
    # The stdlib wave module writes the canonical 44-byte header, no metadata chunks.
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.astype("<i2").tobytes())


def make_speech(out: Path, work: Path) -> list[dict]:
    (out / "speech").mkdir(parents=True)
    clips = []
    for label, word in enumerate(WORDS):
        for t, tmpl in enumerate(SPEECH_TRANSCRIPTS):
            for tag, voice, wpm, pitch in VOICES:
                clips.append({
                    "clip": f"{word}_t{t}_{tag}", "label": label, "template": t,
                    "voice": tag, "espeak": [voice, wpm, pitch],
                    "transcript": tmpl.format(w=word, a=article(word)),
                })
    # Which clips exist as WAV, FLAC or both: the both-set is fixed; the rest is
    # split half/half by a hash order so format is uncorrelated with voice/digit.
    both = [c for c in clips if c["template"] == BOTH_FORMATS_TEMPLATE and c["voice"] == BOTH_FORMATS_VOICE]
    rest = sorted((c for c in clips if c not in both), key=lambda c: splitmix64(int.from_bytes(
        hashlib.sha256(c["clip"].encode()).digest()[:8], "little")))
    for c in both:
        c["formats"] = ["wav", "flac"]
    for k, c in enumerate(rest):
        c["formats"] = ["wav"] if k < len(rest) // 2 else ["flac"]

    rows = []
    for c in clips:
        voice, wpm, pitch = c["espeak"]
        raw = work / f"{c['clip']}_22k.wav"
        run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "-w", str(raw), c["transcript"]])
        with wave.open(str(raw), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, 22050):
                raise RuntimeError(f"unexpected espeak-ng output format {w.getparams()}")
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        y = resample_22050_to_16000(trim_silence(x, 22050))
        wav16 = work / f"{c['clip']}.wav"
        write_wav16k(wav16, y)
        for fmt in c["formats"]:
            rel = f"speech/{c['clip']}.{fmt}"
            if fmt == "wav":
                shutil.copyfile(wav16, out / rel)
            else:
                # -l 0: fixed (integer) predictors only, so the bytes never depend
                # on the CPU's float/FMA paths; no padding block to keep it small.
                run(["flac", "--silent", "--force", "-8", "-l", "0", "--no-padding",
                     "--no-seektable", "-o", str(out / rel), str(wav16)])
            rows.append({
                "audio": rel, "transcript": c["transcript"], "label": c["label"],
                "clip": c["clip"], "voice": c["voice"], "samples": int(len(y)),
            })
    write_jsonl(out / "speech.jsonl", rows)
    return rows


# ---------------------------------------------------------------- interleaved

def make_interleaved(out: Path, images: list[dict], speech: list[dict]) -> None:
    imgs_by = {d: [r for r in images if r["label"] == d] for d in range(10)}
    aud_by = {d: [r for r in speech if r["label"] == d] for d in range(10)}
    rng = Rng(0x5EED_0001)
    docs = []
    for k in range(N_INTERLEAVED):
        kind = k % 4
        d = rng.below(10)
        w, a = WORDS[d], article(WORDS[d])
        img = rng.pick(imgs_by[d])
        aud = rng.pick(aud_by[d])
        if kind == 0:
            parts = [{"text": f"{img['caption'][0].upper()}{img['caption'][1:]}:"}, {"image": img["image"]},
                     {"text": f" Here is how {a} {w} sounds:"}, {"audio": aud["audio"]}]
            labels = [d]
        elif kind == 1:
            parts = [{"text": "Listen:"}, {"audio": aud["audio"]},
                     {"text": f" That was {a} {w}. Written by hand it looks like this:"}, {"image": img["image"]}]
            labels = [d]
        elif kind == 2:
            parts = [{"text": f"Here is {a} {w}:"}, {"image": img["image"]},
                     {"text": " and how it sounds:"}, {"audio": aud["audio"]}]
            labels = [d]
        else:
            e = (d + 1 + rng.below(9)) % 10  # a different digit
            img2, aud2 = rng.pick(imgs_by[e]), rng.pick(aud_by[e])
            parts = [{"text": f"{WORDS[d].capitalize()} comes first"}, {"image": img["image"]},
                     {"text": f" and then {WORDS[e]}"}, {"image": img2["image"]},
                     {"text": f". Together they make {d}{e}. Spoken:"}, {"audio": aud["audio"]},
                     {"text": " then"}, {"audio": aud2["audio"]}]
            labels = [d, e]
        docs.append({"id": f"doc{k:04d}", "labels": labels, "parts": parts})
    write_jsonl(out / "interleaved.jsonl", docs)


# ---------------------------------------------------------------- text

def make_text(out: Path, work: Path) -> None:
    (out / "text").mkdir(parents=True)
    home = work / "home"
    home.mkdir()
    raw = run(["bible", "-f", "gen1:1-rev22:21"], home=str(home), cwd=str(work)).stdout.decode("ascii")
    verse = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    keep = dict(KJV_BOOKS)
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    n_lines = 0
    for line in raw.splitlines():
        n_lines += 1
        m = verse.match(line)
        if not m:
            raise RuntimeError(f"bible output line {n_lines} not a verse: {line[:60]!r}")
        book, ch = m.group(1), int(m.group(2))
        if book not in keep:
            continue
        key = (book, ch)
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(m.group(4).rstrip())
    if n_lines != 31102:
        raise RuntimeError(f"expected 31102 KJV verses, got {n_lines}")
    with open(out / "text" / "kjv.txt", "w", encoding="ascii", newline="\n") as f:
        f.write("The King James Version of the Bible (1611; public domain). Selected books.\n\n")
        for book, ch in order:
            f.write(f"{keep[book]} {ch}\n\n")
            for v in chapters[(book, ch)]:
                f.write(v + "\n")
            f.write("\n")

    # Devil's Dictionary: the dictd data file; keep Bierce's preface and entries,
    # drop dictfmt's database headers and the trailing alphabet entry.
    with gzip.open("/usr/share/dictd/devil.dict.dz", "rb") as f:
        text = f.read().decode("ascii")
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "PREFACE")
    end = len(lines)
    while end > 0 and (lines[end - 1].strip() in ("", "abcdefghijklmnopqrstuvwxyz")):
        end -= 1
    body = "\n".join(l.rstrip() for l in lines[start:end]).strip("\n")
    with open(out / "text" / "devils_dictionary.txt", "w", encoding="ascii", newline="\n") as f:
        f.write("The Devil's Dictionary, by Ambrose Bierce (1911; public domain).\n\n")
        f.write(body + "\n")


# ---------------------------------------------------------------- driver

def sha256sums(out: Path) -> str:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
                   and p.relative_to(out).parts[0] in GENERATED_DIRS + GENERATED_FILES)
    lines = []
    for p in files:
        lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(out).as_posix()}")
    return "\n".join(lines) + "\n"


def generate(out: Path) -> None:
    for d in GENERATED_DIRS:
        shutil.rmtree(out / d, ignore_errors=True)
    for f in GENERATED_FILES:
        (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="motley-datagen-") as tmp:
        work = Path(tmp)
        print("images ...", file=sys.stderr)
        images = make_images(out)
        print("speech ...", file=sys.stderr)
        speech = make_speech(out, work)
        print("interleaved ...", file=sys.stderr)
        make_interleaved(out, images, speech)
        print("text ...", file=sys.stderr)
        make_text(out, work)
    (out / "SHA256SUMS").write_text(sha256sums(out), encoding="ascii")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({len(images)} images, {len(speech)} audio files, {total/1e6:.2f} MB incl. hand-written files)",
          file=sys.stderr)


def check() -> int:
    committed = (HERE / "SHA256SUMS").read_text(encoding="ascii")
    ok = True
    # 1. the committed files match the committed SHA256SUMS
    if sha256sums(HERE) != committed:
        print("committed files differ from committed SHA256SUMS", file=sys.stderr)
        ok = False
    # 2. a fresh regeneration reproduces them byte for byte
    with tempfile.TemporaryDirectory(prefix="motley-datagen-check-") as tmp:
        fresh = Path(tmp) / "sample"
        generate(fresh)
        regenerated = (fresh / "SHA256SUMS").read_text(encoding="ascii")
    if regenerated != committed:
        a, b = set(committed.splitlines()), set(regenerated.splitlines())
        for line in sorted(a - b)[:20]:
            print(f"  committed only:   {line}", file=sys.stderr)
        for line in sorted(b - a)[:20]:
            print(f"  regenerated only: {line}", file=sys.stderr)
        ok = False
    n = len(committed.splitlines())
    print(f"check: {'OK' if ok else 'MISMATCH'} ({n} files)", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--allow-drift", action="store_true")
    args = ap.parse_args()
    check_versions(args.allow_drift)
    if args.check:
        return check()
    generate(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
