#!/usr/bin/env bash
# Device side of benchmarks/quality/fullwiki_pieces.sh. Run it from the repository root in each chained call,
# with that call's piece carried (scratch/fullwiki-pieces/pieceN). It adds every carried piece to $FULLWIKI_DIR
# (default /tmp/fullwiki; the machine's /tmp lives while it stays warm). Once every piece that the manifest
# names is there, it checks the archive's sha256, extracts it, and checks the sha256 of every extracted file
# (files.sha256). Safe to run again: a piece already present is skipped, and a complete set is not extracted twice.
# usage: bash benchmarks/quality/fullwiki_unpack.sh [--need-complete]
# Prints how many pieces are present and whether the set is complete; when it is complete, the last line is the
# data path for rung.sh (WIKI=...).
# Exit status: 0 when consistent (complete or not); with --need-complete, 1 while pieces are missing;
# 2 for a corrupt piece or pieces from two different builds.
set -euo pipefail
need=0; [ "${1:-}" = --need-complete ] && need=1
src=${FULLWIKI_PIECES:-scratch/fullwiki-pieces}
dest=${FULLWIKI_DIR:-/tmp/fullwiki}
fail() { echo "fullwiki_unpack: $*" >&2; exit 2; }
field() { awk -v k="$1" '$1 == k { print $2; exit }' "$2"; }  # first value of key $1 in manifest $2

mkdir -p "$dest/parts"
for dir in "$src"/piece*/; do
  [ -f "$dir/MANIFEST" ] || continue
  build=$(field build "$dir/MANIFEST")
  if [ -f "$dest/MANIFEST" ]; then
    [ "$(field build "$dest/MANIFEST")" = "$build" ] ||
      fail "$dir is from build $build, but $dest holds build $(field build "$dest/MANIFEST"); remove $dest first"
  else
    cp "$dir/MANIFEST" "$dest/MANIFEST.tmp" && mv "$dest/MANIFEST.tmp" "$dest/MANIFEST"
  fi
  [ -f "$dest/COMPLETE" ] && continue
  while read -r _ index name bytes sha; do
    [ -f "$dir/$name" ] || continue
    if [ -f "$dest/parts/$name" ]; then echo "piece $index: already present"; continue; fi
    got=$(sha256sum "$dir/$name" | cut -d' ' -f1)
    [ "$got" = "$sha" ] || fail "$dir/$name: sha256 $got, the manifest says $sha (a broken transfer?)"
    cp "$dir/$name" "$dest/parts/$name.tmp" && mv "$dest/parts/$name.tmp" "$dest/parts/$name"
    echo "piece $index: added ($bytes bytes)"
  done < <(grep '^piece ' "$dir/MANIFEST")
done
[ -f "$dest/MANIFEST" ] || { echo "no pieces carried (expected $src/pieceN/MANIFEST) and none in $dest"; exit $need; }

manifest=$dest/MANIFEST
total=$(field pieces "$manifest")
data=$dest/$(field data "$manifest")
if [ ! -f "$dest/COMPLETE" ]; then
  present=0 missing=()
  while read -r _ index name _ _; do
    if [ -f "$dest/parts/$name" ]; then present=$((present + 1)); else missing+=("$index"); fi
  done < <(grep '^piece ' "$manifest")
  echo "pieces present: $present of $total in $dest/parts"
  if [ "$present" -lt "$total" ]; then
    echo "complete: no (missing: ${missing[*]}; carry scratch/fullwiki-pieces/pieceN in the next call on this warm machine)"
    exit $need
  fi
  start=$(date +%s%N)
  parts=(); while read -r _ _ name _ _; do parts+=("$dest/parts/$name"); done < <(grep '^piece ' "$manifest")
  got=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
  [ "$got" = "$(field archive "$manifest")" ] || fail "the joined pieces have sha256 $got, the manifest says $(field archive "$manifest")"
  rm -rf "$dest/extract.tmp"; mkdir "$dest/extract.tmp"
  cat "${parts[@]}" | xz -dc -T0 | tar -x -C "$dest/extract.tmp" -f -
  (cd "$dest/extract.tmp" && sha256sum -c --quiet files.sha256) || fail "extracted files differ from files.sha256"
  rm -rf "$data"; mv "$dest/extract.tmp/$(field data "$manifest")" "$data"
  mv "$dest/extract.tmp/files.sha256" "$dest/files.sha256"; rmdir "$dest/extract.tmp"
  rm -f "${parts[@]}"
  date -u +%FT%TZ > "$dest/COMPLETE"
  echo "joined, checked and extracted in $(( ($(date +%s%N) - start) / 1000000 )) ms"
fi
echo "pieces present: $total of $total; complete: yes ($(field kind "$manifest"), $(du -sh "$data" | cut -f1))"
echo "WIKI=$data"
