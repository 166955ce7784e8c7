fn main() {
    println!("cargo:rerun-if-changed=c/adamw.c");
    cc::Build::new()
        .file("c/adamw.c")
        .opt_level(3)
        .flag("-march=native")
        .flag("-fno-math-errno")
        .flag("-fopenmp")
        .compile("roofline");
    println!("cargo:rustc-link-lib=gomp");
}
