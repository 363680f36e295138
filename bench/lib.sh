# Shell helpers shared by bench/run.sh and bench/soak.sh (sourced, not run).

# build_example_versions TARGET_DIR OUT_DIR VERSION...
# Builds the example handler once per VERSION (EXAMPLE_HANDLER_VERSION=VERSION, release) and
# copies each library to OUT_DIR/VERSION.so, then puts the default build back.
build_example_versions() {
    local target=$1 dir=$2 v
    shift 2
    mkdir -p "$dir"
    for v in "$@"; do
        EXAMPLE_HANDLER_VERSION=$v cargo build --release -p example-handler >&2
        cp "$target/release/libexample_handler.so" "$dir/$v.so"
    done
    cargo build --release -p example-handler >&2 # put the default build back
}
