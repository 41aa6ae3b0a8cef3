#!/usr/bin/env bash
# Usage: .ci/check_commits.sh BASE [MAX]
#
# Fails (exit 1) if a commit newer than BASE has a subject longer than MAX characters
# (default 72), and prints each offending commit. BASE is the last commit before the rule,
# so the older history (subjects of up to 544 characters) is not judged.
#
# When BASE is not in the clone:
# - a shallow clone (CI checkouts often are) cut the history above BASE, so every commit
#   it holds is newer than BASE: all of them are checked;
# - a full clone without BASE (history rewritten, or another repository) has no way to
#   tell old commits from new: the check is skipped with a note, exit 0.
# Outside a git work tree (a source tarball) there is nothing to check: note, exit 0.
set -euo pipefail

base="${1:?usage: check_commits.sh BASE [MAX]}"
max="${2:-72}"
# Count characters, not bytes, where a UTF-8 locale exists (else bytes: stricter).
for loc in C.UTF-8 C.utf8 en_US.UTF-8 en_US.utf8; do
    if locale -a 2>/dev/null | grep -qx "$loc"; then
        export LC_ALL="$loc"
        break
    fi
done

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "check_commits: not a git work tree; commit subjects not checked"
    exit 0
fi

if git cat-file -e "${base}^{commit}" 2>/dev/null; then
    range=("${base}..HEAD")
    what="after ${base}"
elif [ "$(git rev-parse --is-shallow-repository)" = "true" ]; then
    range=(HEAD)
    what="in this shallow clone, which lacks ${base}: all checked"
else
    echo "check_commits: ${base} is not in this repository; commit subjects not checked"
    exit 0
fi

n=0
bad=0
while IFS= read -r line; do
    n=$((n + 1))
    hash="${line%% *}"
    subject="${line#* }"
    if [ "${#subject}" -gt "$max" ]; then
        bad=$((bad + 1))
        echo "subject of ${hash} is ${#subject} characters (at most ${max}): ${subject}"
    fi
done < <(git log --format='%h %s' "${range[@]}")

if [ "$bad" -gt 0 ]; then
    echo "check_commits: ${bad} of ${n} commits (${what}) have a subject over ${max} characters."
    echo "Write a short subject, then a blank line and the details in the body (git commit --amend, git rebase -i)."
    exit 1
fi
echo "check_commits: ${n} commits (${what}): every subject is at most ${max} characters"
