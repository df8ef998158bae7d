//! Link-time glue for libtorch (rpath, keep libtorch_cuda; see link_libtorch.rs) and the
//! C++ shims in `csrc/` (fused AdamW, operator counting, CUDA capability, the tower_linear
//! op), compiled against the same libtorch's headers.
include!("link_libtorch.rs");

fn main() {
    link_libtorch();
    let shims = ["csrc/fused_adamw.cpp", "csrc/op_count.cpp", "csrc/cuda_capability.cpp", "csrc/tower_linear.cpp"];
    for f in shims {
        println!("cargo:rerun-if-changed={f}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report libtorch's lib folder (DEP_TCH_LIBTORCH_LIB)");
    };
    let include = std::path::Path::new(&lib).join("../include");
    cc::Build::new()
        .cpp(true)
        .files(shims)
        .include(&include)
        .flag("-std=c++17")
        // The PyPI wheels are built with the new libstdc++ ABI (torch 2.11: always).
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("motley_shims");
}
