//! Link-time glue for libtorch (rpath, keep libtorch_cuda; see link_libtorch.rs) and the
//! C++ shims in `csrc/` (fused AdamW, operator counting, memory tracking, CUDA capability, the
//! tower_linear and chunked cross-entropy ops, torch's profiler, torch's c10d for data
//! parallelism), compiled against the same libtorch's headers.
include!("link_libtorch.rs");

use std::path::{Path, PathBuf};

fn main() {
    link_libtorch();
    let shims = [
        "csrc/fused_adamw.cpp",
        "csrc/op_count.cpp",
        "csrc/cuda_capability.cpp",
        "csrc/tower_linear.cpp",
        "csrc/linear_cross_entropy.cpp",
        "csrc/mem_track.cpp",
        "csrc/checkpoint.cpp",
        "csrc/profiler.cpp",
    ];
    // c10d: Gloo and the gradient hooks need only torch's headers (plus stand-ins for the
    // Gloo headers the wheel lacks); NCCL needs CUDA's (and USE_CUDA), so it is a unit of its own.
    let c10d = ["csrc/c10d.cpp", "csrc/grad_sync.cpp"];
    let nccl = "csrc/c10d_nccl.cpp";
    for f in shims.iter().chain(&c10d).chain([&nccl]) {
        println!("cargo:rerun-if-changed={f}");
    }
    for f in ["csrc/c10d_shim.h", "csrc/gloo_stub"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=MOTLEY_CUDA_HEADERS");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report libtorch's lib folder (DEP_TCH_LIBTORCH_LIB)");
    };
    let include = Path::new(&lib).join("../include");
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(&include)
            // torch/types.h and friends (c10d's headers include them) live here.
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            // The PyPI wheels are built with the new libstdc++ ABI (torch 2.11: always).
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .define("GLOG_USE_GLOG_EXPORT", None)
            .warnings(false);
        b
    };
    // One translation unit for the shims and Gloo's c10d: each file alone parses torch's headers
    // again (~20 s apiece, 130 s for the nine); included into one they compile in ~30 s. The
    // files stay separate, one job each; USE_C10D_GLOO only changes what c10d's headers declare.
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let unity = out.join("motley_shims.cpp");
    let body: String =
        shims.iter().chain(&c10d).map(|f| format!("#include \"{}\"\n", here.join(f).display())).collect();
    std::fs::write(&unity, body).expect("write the shims' translation unit into OUT_DIR");
    base().file(&unity).include(here.join("csrc/gloo_stub")).define("USE_C10D_GLOO", None).compile("motley_shims");
    // The site folder of the torch wheel holds nvidia/cu13/include and nvidia/nccl/include;
    // scripts/setup adds the two header-only wheels they lack (crt/, nv/target).
    let site = Path::new(&lib).join("../..");
    let extra =
        std::env::var("MOTLEY_CUDA_HEADERS").map(PathBuf::from).unwrap_or_else(|_| site.join("../cuda-headers-13.0"));
    let cuda_dirs = [
        extra.join("nvidia/cu13/include"),
        extra.join("nvidia/cu13/include/cccl"),
        site.join("nvidia/cu13/include"),
        site.join("nvidia/nccl/include"),
    ];
    for d in &cuda_dirs {
        if !d.exists() {
            panic!(
                "CUDA header folder {} is missing: the NCCL process group is compiled into every build; \
                 run scripts/setup (it installs the header wheels) or set MOTLEY_CUDA_HEADERS",
                d.display()
            );
        }
    }
    let mut b = base();
    b.file(nccl).define("USE_C10D_NCCL", None).define("USE_CUDA", None);
    for d in &cuda_dirs {
        b.include(d);
    }
    b.flag("-Wno-interference-size").compile("motley_c10d_nccl");
}
