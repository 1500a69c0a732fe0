//! README.md shows this app in full; these tests keep the two in step. (The README's Rust blocks
//! that are not `ignore` also compile as doctests of this crate: see `src/lib.rs`.)

use std::path::Path;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn readme() -> String {
    read("../../README.md")
}

/// Each line without its leading whitespace, so that an excerpt matches at any indentation.
fn dedented(text: &str) -> String {
    text.lines()
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The fenced blocks of `markdown`: (info string, content).
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, Vec<&str>)> = None;
    for line in markdown.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim().to_owned(), Vec::new())),
            (Some(_), Some("")) => {
                let (info, lines) = open.take().expect("a block is open");
                blocks.push((info, lines.join("\n")));
            }
            (Some((_, lines)), _) => lines.push(line),
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README.md ends inside a fenced block");
    blocks
}

#[test]
fn the_readme_shows_each_file_of_the_app_in_full() {
    let readme = readme();
    let lib = read("src/lib.rs");
    // The README doctest hook at the end of lib.rs is this repository's, not the user's.
    let (lib, _) = lib
        .split_once("\n// The README's Rust blocks")
        .expect("src/lib.rs ends with the README doctest hook");
    for (name, text) in [
        ("build.rs", read("build.rs")),
        ("proto/greeter.proto", read("proto/greeter.proto")),
        ("src/lib.rs", lib.to_owned()),
        ("src/main.rs", read("src/main.rs")),
    ] {
        let block = format!("\n{}\n```", text.trim_end());
        assert!(
            readme.contains(&block),
            "README.md does not show {name} as it is"
        );
    }
}

#[test]
fn the_readme_cargo_toml_lists_the_apps_dependencies() {
    let readme = readme();
    let manifest = read("Cargo.toml");
    let (_, deps) = manifest.split_once("[dependencies]\n").unwrap();
    let (deps, _) = deps.split_once("\n[dev-dependencies]").unwrap();
    let shown = deps.replace(r#"towline = { path = "../.." }"#, r#"towline = "0.1""#);
    let block = format!("```toml\n[dependencies]\n{}\n```", shown.trim_end());
    assert!(
        readme.contains(&block),
        "README.md's Cargo.toml is not the app's:\n{block}"
    );
}

#[test]
fn every_ignored_rust_block_is_an_excerpt_of_code_that_compiles() {
    let sources = [
        "src/main.rs",
        "src/lib.rs",
        "build.rs",
        "../per_endpoint.rs",
        "../../src/discover/full_set.rs",
    ]
    .map(|path| dedented(&read(path)));
    let ignored: Vec<_> = blocks(&readme())
        .into_iter()
        .filter(|(info, _)| info == "rust,ignore")
        .collect();
    assert!(ignored.len() >= 4, "the README's excerpts went missing");
    for (_, block) in ignored {
        let excerpt = dedented(&block);
        assert!(
            sources.iter().any(|source| source.contains(&excerpt)),
            "a `rust,ignore` block in README.md is in no compiled file:\n{block}"
        );
    }
}
