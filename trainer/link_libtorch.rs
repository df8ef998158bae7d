// Shared body of trainer/build.rs and tools/build.rs (included, so no inner doc comment here):
// bake libtorch's lib folder into the rpath and keep libtorch_cuda linked.
//
// torch-sys's own rpath flag only reaches its C++ wrapper, not our binaries, and the default
// `--as-needed` drops `libtorch_cuda.so` (then `tch::Cuda::is_available()` is false on a GPU
// machine; tch-rs #907/#980). `cargo:rustc-link-arg` only applies to the package whose build
// script prints it, hence one include per package that produces binaries or test binaries.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // The pip wheel's CUDA libraries sit beside torch/ in site-packages/nvidia/*/lib,
        // which libtorch_cuda finds through its own $ORIGIN rpath.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        for l in ["torch", "torch_cpu"] {
            println!("cargo:rustc-link-arg=-l{l}");
        }
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-ltorch_cuda");
        }
        // The NCCL process group shim (trainer/csrc/c10d_nccl.cpp) calls c10::cuda directly.
        if std::path::Path::new(&lib).join("libc10_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-lc10_cuda");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
