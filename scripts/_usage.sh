# Sourced first by the repository's shell scripts (`source scripts/_usage.sh "$@"`): with -h or --help as the first
# argument, print the calling script's header comment (its usage) and exit 0, before it installs or runs anything.
case "${1:-}" in
  -h | --help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
    ;;
esac
