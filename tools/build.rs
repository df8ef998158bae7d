//! Same libtorch rpath / no-as-needed link arguments as the trainer (see that file).
include!("../trainer/build.rs");
