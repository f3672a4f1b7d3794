#!/bin/sh
# with_artifacts.sh PROGRAM ARGS...: replaces @COND / @UNCOND by $IIA_TEST_COND / $IIA_TEST_UNCOND (compiled
# artifacts; tests/test_native.py makes them and runs ctest). A missing one FAILS the test, it does not skip.
if [ -z "$IIA_TEST_COND" ] || [ -z "$IIA_TEST_UNCOND" ]; then
    echo "set IIA_TEST_COND (class-conditional image artifact) and IIA_TEST_UNCOND (unconditional artifact); python -m pytest tests/test_native.py does" >&2
    exit 1
fi
program=$1
shift
for arg in "$@"; do
    case $arg in
        @COND) arg=$IIA_TEST_COND ;;
        @UNCOND) arg=$IIA_TEST_UNCOND ;;
        *@COND*) arg=$(printf '%s' "$arg" | sed "s|@COND|$IIA_TEST_COND|") ;;
    esac
    set -- "$@" "$arg"
    shift
done
exec "$program" "$@"
