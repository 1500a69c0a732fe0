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
        ("src/demo.rs", read("src/demo.rs")),
        ("src/main.rs", read("src/main.rs")),
        ("src/bin/layered.rs", read("src/bin/layered.rs")),
    ] {
        let block = format!("\n{}\n```", text.trim_end());
        assert!(
            readme.contains(&block),
            "README.md does not show {name} as it is"
        );
    }
}

/// The README's first Rust block, before "Get started": the one-call client, as `src/main.rs`
/// has it, in under 15 lines.
#[test]
fn the_readme_opens_with_the_one_call_client_the_app_runs() {
    let readme = readme();
    let (opening, _) = readme.split_once("\n## ").expect("README.md has sections");
    let (info, block) = blocks(opening)
        .into_iter()
        .find(|(info, _)| info.starts_with("rust"))
        .expect("README.md opens with a Rust block");
    assert_eq!(
        info, "rust,ignore",
        "the opening block is an excerpt of src/main.rs"
    );
    assert!(
        dedented(&read("src/main.rs")).contains(&dedented(&block)),
        "README.md's opening block is not in src/main.rs:\n{block}"
    );
    assert!(
        block.contains("towline::Channel::builder(") && block.contains("GreeterClient::new("),
        "the opening block builds the channel and the client:\n{block}"
    );
    let lines = block.lines().count();
    assert!(lines < 15, "the one-call client takes {lines} lines");
}

/// Further down, "the same stack, layer by layer": `src/bin/layered.rs`'s stack.
#[test]
fn the_readme_shows_the_same_stack_layer_by_layer() {
    let layered = dedented(&read("src/bin/layered.rs"));
    let shown = blocks(&readme()).into_iter().any(|(info, block)| {
        info == "rust,ignore"
            && block.contains("ServiceBuilder::new()")
            && block.contains(".service(Connect::new());")
            && block.contains("GreeterClient::new(stack)")
            && layered.contains(&dedented(&block))
    });
    assert!(shown, "README.md does not show src/bin/layered.rs's stack");
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
        "src/bin/layered.rs",
        "src/demo.rs",
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
