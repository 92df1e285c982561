#!/usr/bin/env bash
# Builds the carry pieces of the whole shared English Wikipedia (../shared/data/wikipedia, part1 + part2) for
# quality rungs on the GPU machine, whose calls carry at most 64 MiB each (benchmarks/budget_run.md, section
# "All of the shared Wikipedia"). Run it here, on the CPU, from the repository root:
#   bash benchmarks/quality/fullwiki_pieces.sh [overrides for jaxbert prepare...]
# KIND=prepared (the default): `jaxbert prepare --config budget` here (about 20 min on 2 cores; reused from
#   $CACHE when done before), then the prepared directory (train.bin, validation.bin, meta.json, tokenizer.json,
#   vocab.txt) is archived: the device trains no tokenizer and tokenises nothing.
# KIND=text: the WikiExtractor files, decompressed (plain wiki_NN files in the same tree), in one xz stream; the
#   device then prepares them itself (tokenizer training + tokenising, ~95 s on its 16 cores).
# The archive (deterministic tar | xz) is split into the fewest equal pieces of at most PIECE_MIB MiB, each in
# $OUT/pieceN/ beside a MANIFEST (sha256 of the archive and of every piece); the carry list of each device call
# is printed last. The device side is benchmarks/quality/fullwiki_unpack.sh.
# env: SRC (../shared/data/wikipedia), OUT (scratch/fullwiki-pieces), CACHE (scratch/fullwiki-cache), KIND,
#   PIECE_MIB (60), PIECE_BYTES (instead of PIECE_MIB, for tests), XZ_LEVEL (6), KEEP=1 keeps the whole archive
#   and the staging folder under $OUT.
set -euo pipefail
src=${SRC:-../shared/data/wikipedia} out=${OUT:-scratch/fullwiki-pieces} cache=${CACHE:-scratch/fullwiki-cache}
kind=${KIND:-prepared} level=${XZ_LEVEL:-6}
limit=${PIECE_BYTES:-$(( ${PIECE_MIB:-60} * 1048576 ))}
threads=$(nproc)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
[ -d "$src" ] || { echo "fullwiki_pieces: no corpus at $src (set SRC)" >&2; exit 2; }
mkdir -p "$out"
rm -rf "$out"/piece* "$out/stage" "$out/fullwiki.tar.xz" "$out/split.tmp"
stage=$out/stage; mkdir -p "$stage"

SECONDS=0
case $kind in
  prepared)
    data=prepared
    echo "== jaxbert prepare --config budget data.source=$src data.cache_dir=$cache $*"
    jaxbert prepare --config budget --quiet data.source="$src" data.cache_dir="$cache" "$@" | tee "$out/prepare.log"
    prepared=$(tail -n 1 "$out/prepare.log")
    [ -f "$prepared/meta.json" ] || { echo "fullwiki_pieces: no prepared directory at '$prepared'" >&2; exit 2; }
    mkdir -p "$stage/$data"
    for f in "$prepared"/*; do ln "$f" "$stage/$data/" 2>/dev/null || cp "$f" "$stage/$data/"; done
    ;;
  text)
    data=wiki
    echo "== decompressing the WikiExtractor files of $src ($threads processes)"
    src_abs=$(cd "$src" && pwd); mkdir -p "$stage/$data"; dst_abs=$(cd "$stage/$data" && pwd)
    (cd "$src_abs" && find . -type d | sed 1d) | (cd "$dst_abs" && xargs -r mkdir -p)
    (cd "$src_abs" && find . -type f ! -name '.*' | LC_ALL=C sort) |
      SRC_ABS=$src_abs DST=$dst_abs xargs -P "$threads" -I{} sh -c \
      'case "{}" in *.bz2) bzip2 -dc "$SRC_ABS/{}" > "$DST/$(echo "{}" | sed "s/\.bz2\$//")";; *) cp "$SRC_ABS/{}" "$DST/{}";; esac'
    ;;
  *) echo "fullwiki_pieces: KIND must be prepared or text, not '$kind'" >&2; exit 2 ;;
esac
echo "staged $(du -sb "$stage/$data" | cut -f1) bytes in $SECONDS s"

SECONDS=0
(cd "$stage" && find "$data" -type f | LC_ALL=C sort | xargs sha256sum > files.sha256)
# multi-block xz (24 MiB blocks), so that an xz >= 5.4 decompresses with all cores there
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$stage" -cf - files.sha256 "$data" |
  xz -T"$threads" -"$level" --block-size=24MiB -c > "$out/fullwiki.tar.xz"
size=$(stat -c %s "$out/fullwiki.tar.xz")
sha=$(sha256sum "$out/fullwiki.tar.xz" | cut -d' ' -f1)
echo "archive: $size bytes ($(mib "$size") MiB, xz -$level) in $SECONDS s, sha256 $sha"

n=$(( (size + limit - 1) / limit )); chunk=$(( (size + n - 1) / n ))
mkdir "$out/split.tmp"
split -b "$chunk" --numeric-suffixes=1 -a 2 "$out/fullwiki.tar.xz" "$out/split.tmp/fullwiki.tar.xz.part"
{
  echo "# carry pieces of benchmarks/quality/fullwiki_pieces.sh; device side: benchmarks/quality/fullwiki_unpack.sh"
  echo "build ${sha:0:16}"
  echo "kind $kind"
  echo "data $data"
  echo "archive $sha"
  echo "bytes $size"
  echo "pieces $n"
  i=0
  for f in "$out"/split.tmp/*; do
    i=$((i + 1))
    echo "piece $i $(basename "$f") $(stat -c %s "$f") $(sha256sum "$f" | cut -d' ' -f1)"
  done
} > "$out/MANIFEST"
i=0
for f in "$out"/split.tmp/*; do
  i=$((i + 1)); mkdir "$out/piece$i"; mv "$f" "$out/piece$i/"; cp "$out/MANIFEST" "$out/piece$i/"
done
rmdir "$out/split.tmp"
[ "${KEEP:-0}" = 1 ] || rm -rf "$out/fullwiki.tar.xz" "$stage"
echo "$n piece(s) of at most $(mib "$chunk") MiB under $out (limit $(mib "$limit") MiB)"

# what each chained device call carries: pieceN; the last call, which completes the set and runs the rung, also
# carries the wheels and the GLUE archive that benchmarks/finetune/device_setup.sh installs
tracked=$( (git ls-files -z 2>/dev/null || true) | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
tracked=${tracked:-0}
for i in $(seq 1 "$n"); do
  carry=("$out/piece$i"); bytes=$((tracked + $(du -sb "$out/piece$i" | cut -f1)))
  if [ "$i" = "$n" ]; then
    for extra in .whl scratch/budget/glue.tar.xz; do
      if [ -e "$extra" ]; then carry+=("$extra"); bytes=$((bytes + $(du -sb "$extra" | cut -f1))); fi
    done
  fi
  warn=""; [ "$bytes" -le $((64 * 1048576)) ] || warn="  OVER THE 64 MiB LIMIT"
  printf 'call %d carry: %s(%s MiB with the tracked files)%s\n' "$i" "$(printf '"%s" ' "${carry[@]}")" "$(mib "$bytes")" "$warn"
done
