//! Generates the parser from `src/grammar.lalrpop` into `OUT_DIR/grammar.rs`.
fn main() {
    lalrpop::Configuration::new()
        .use_cargo_dir_conventions()
        .process()
        .expect("the grammar in src/grammar.lalrpop must generate a parser");
    println!("cargo:rerun-if-changed=src/grammar.lalrpop");
}
