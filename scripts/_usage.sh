# Sourced first by the repository's shell scripts (`source scripts/_usage.sh "$@"`): with -h or --help as the first
# argument, print the calling script's header comment (its usage) and exit 0, before it installs or runs anything.
# A script that defines a function `usage_extra` before sourcing this gets it called after the header.
case "${1:-}" in
  -h | --help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    if declare -F usage_extra > /dev/null; then usage_extra; fi
    exit 0
    ;;
esac
