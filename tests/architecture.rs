//! The architecture of DESIGN §5, checked by reading `src/` as text:
//!
//! - the walls: which top-level module may name which (`crate::x` in
//!   non-test code, grouped `use crate::{…}` included);
//! - nothing outside `src/store/` names a storage engine;
//! - domain code knows nothing of tonic, and every status the vault sends is
//!   built by the one error table, `api/status.rs`;
//! - no function is longer than 80 lines, except the declarative tables
//!   listed here with their reason;
//! - the build links the vendored sled, with the fix it was vendored for
//!   (`vendor/README.md`);
//! - the fuzz crate builds exactly the modules `crypto` may reach
//!   (`fuzz/README.md`).
//!
//! A failure names the file, the line and the rule it breaks.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

/// Who may import whom. A module not listed as a key may import anything
/// (the crate root and the binary). DESIGN §5 fixes the forbidden
/// directions; this table is the allowed list that keeps them closed.
const ALLOWED: &[(&str, &[&str])] = &[
    // The wire: never the store, the assembly or the config file.
    (
        "api",
        &["auth", "broker", "upstream", "secret", "telemetry"],
    ),
    // Identity and policy: knows no storage, no lifecycle, no wire.
    ("auth", &["secret"]),
    // The lifecycle: never the api, the server or the config file.
    (
        "broker",
        &["crypto", "store", "upstream", "secret", "telemetry"],
    ),
    // The OAuth client knows nothing of the lifecycle.
    ("upstream", &["secret"]),
    // Webhook sinks read events from the broker and post them through the
    // upstream HTTP client and its endpoint policy.
    ("webhooks", &["broker", "upstream", "secret", "telemetry"]),
    // The store never reaches the broker (nor anything else).
    ("store", &[]),
    // Crypto never reaches the store. `fuzz/` builds crypto with exactly
    // what it may reach (`the_fuzz_crate_builds_the_whole_of_what_crypto_reaches`).
    ("crypto", &["secret", "files"]),
    // The config knows no domain internals beyond the settings it builds.
    ("config", &["secret", "telemetry"]),
    ("telemetry", &[]),
    ("files", &["secret"]),
    ("secret", &[]),
    ("dev", &["crypto", "files", "secret"]),
    // Assembly: wires everything but the command line.
    (
        "server",
        &[
            "api",
            "auth",
            "broker",
            "config",
            "crypto",
            "files",
            "secret",
            "store",
            "telemetry",
            "upstream",
            "webhooks",
        ],
    ),
    // The command line: the assembly's entry point, offline store and
    // keyring operations (backups are the broker's format), and the admin
    // client.
    (
        "cli",
        &[
            "api",
            "broker",
            "config",
            "crypto",
            "dev",
            "files",
            "secret",
            "server",
            "store",
            "telemetry",
        ],
    ),
];

/// Functions allowed past 80 lines: declarative tables, not logic.
const LONG_TABLES: &[(&str, &str)] = &[];

const MAX_FN_LINES: usize = 80;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/broker/write.rs` -> `broker`; `src/config.rs` -> `config`.
fn module_of(path: &Path) -> String {
    let relative = path.strip_prefix(src()).unwrap();
    let first = relative.components().next().unwrap();
    first
        .as_os_str()
        .to_str()
        .unwrap()
        .trim_end_matches(".rs")
        .to_owned()
}

/// The file without its unit tests (`#[cfg(test)]` to the end of the file,
/// where this code base keeps them) and without comments.
fn production_lines(path: &Path) -> Vec<(usize, String)> {
    let text = fs::read_to_string(path).unwrap();
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        lines.push((i + 1, code.to_owned()));
    }
    lines
}

/// Every top-level module a piece of code names through `crate::`.
fn crate_references(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the first name of each
            // element at depth one.
            let mut depth = 1;
            let mut element = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        found.push(first_name(&element));
                        element.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 {
                    element.push(ch);
                }
            }
            found.push(first_name(&element));
        } else {
            found.push(first_name(rest));
        }
    }
    found.retain(|name| !name.is_empty());
    found
}

fn first_name(text: &str) -> String {
    text.trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn walls_of_design_section_5_hold() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut breaches = Vec::new();
    for file in &files {
        let module = module_of(file);
        let Some(may) = allowed.get(module.as_str()) else {
            continue;
        };
        // Grouped imports span lines: read the production code as one text.
        let code: String = production_lines(file)
            .into_iter()
            .map(|(_, line)| line + "\n")
            .collect();
        for target in crate_references(&code) {
            if target != module && !may.contains(&target.as_str()) {
                breaches.push(format!(
                    "{}: `{module}` names `crate::{target}`",
                    file.display()
                ));
            }
        }
    }
    assert!(
        breaches.is_empty(),
        "walls crossed:\n{}",
        breaches.join("\n")
    );
}

#[test]
fn the_wall_checker_sees_grouped_and_inline_imports() {
    let code =
        "use crate::{\n    api::pb,\n    store::{self, X},\n};\nlet x = crate::config::load();";
    assert_eq!(crate_references(code), ["api", "store", "config"]);
}

/// Every production line in `src/` that `breaks` flags, as `path:line:
/// code`; `breaks` is given the file's path under `src/` (`broker/write.rs`)
/// and one line.
fn lines_that(breaks: impl Fn(&str, &str) -> bool) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut found = Vec::new();
    for file in &files {
        let path = relative(file);
        for (number, line) in production_lines(file) {
            if breaks(&path, &line) {
                found.push(format!("src/{path}:{number}: {}", line.trim()));
            }
        }
    }
    found
}

fn relative(file: &Path) -> String {
    file.strip_prefix(src())
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

/// Whether `path` is the module `module` or inside it (`store/etcd` holds
/// `store/etcd/rpc.rs`; `config` is `config.rs`).
fn in_module(path: &str, module: &str) -> bool {
    path == format!("{module}.rs") || path.starts_with(&format!("{module}/"))
}

#[test]
fn nothing_above_the_store_names_a_storage_engine() {
    let breaches = lines_that(|path, line| {
        !in_module(path, "store")
            && (line.contains("sled::")
                || line.contains("SledStore")
                || line.contains("etcd_client"))
    });
    assert!(
        breaches.is_empty(),
        "a backend named outside src/store:\n{}",
        breaches.join("\n")
    );
}

/// Where tonic may be named (DESIGN §5: domain code knows nothing of
/// tonic): the wire (`api/`), the assembly that serves it (`server/`), the
/// admin client that reads the vault's answers (`cli/`), and the etcd
/// backend, whose client speaks gRPC to etcd.
const TONIC_MAY_BE_NAMED_IN: &[&str] = &["api", "server", "cli", "store/etcd"];

/// The one table from failures to the wire (DESIGN §4 and §5): the only file
/// that builds a `tonic::Status` or picks a `tonic::Code`.
const STATUS_TABLE: &str = "api/status.rs";

/// Whether `name::` appears as a path of its own at `at` (not the tail of
/// `FlowStatus::` or `StatusCode::`).
fn standalone(line: &str, at: usize) -> bool {
    line[..at]
        .chars()
        .next_back()
        .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
}

/// Whether a line builds a status by hand: a `Status::` constructor other
/// than `from`, which goes through the table.
fn builds_a_status(line: &str) -> bool {
    line.match_indices("Status::").any(|(at, _)| {
        let next = first_name(&line[at + "Status::".len()..]);
        standalone(line, at) && next != "from" && next.starts_with(|c: char| c.is_lowercase())
    })
}

/// Whether a line names a gRPC code (`Code::Unavailable`).
fn picks_a_code(line: &str) -> bool {
    line.match_indices("Code::")
        .any(|(at, _)| standalone(line, at))
}

#[test]
fn domain_code_knows_nothing_of_tonic() {
    let breaches = lines_that(|path, line| {
        !TONIC_MAY_BE_NAMED_IN
            .iter()
            .any(|module| in_module(path, module))
            && line.contains("tonic")
    });
    assert!(
        breaches.is_empty(),
        "tonic named outside the wire, the assembly and the clients:\n{}",
        breaches.join("\n")
    );
}

#[test]
fn every_status_the_vault_sends_is_built_by_the_one_table() {
    let breaches = lines_that(|path, line| {
        // Clients read the codes they receive (the admin client, the etcd
        // client's retry rule); only the vault's own side builds statuses.
        let client = in_module(path, "cli") || in_module(path, "store/etcd");
        path != STATUS_TABLE && (builds_a_status(line) || (!client && picks_a_code(line)))
    });
    assert!(
        breaches.is_empty(),
        "a status built outside src/{STATUS_TABLE} (add a variant to ApiError instead):\n{}",
        breaches.join("\n")
    );
}

#[test]
fn the_status_checker_tells_a_hand_built_status_from_other_types() {
    assert!(builds_a_status(
        "finish(Status::new(Code::Unavailable, \"x\"))"
    ));
    assert!(builds_a_status("Err(tonic::Status::internal(\"x\"))"));
    assert!(picks_a_code("let code = Code::NotFound;"));
    assert!(picks_a_code("tonic::Code::Unavailable => true,"));
    for other in [
        "Err(Status::from(ApiError::Broker(error)))",
        "PENDING => FlowStatus::Pending,",
        "(StatusCode::OK, \"ok\")",
        "ExitCode::SUCCESS",
        "-> Result<Response<T>, Status>",
    ] {
        assert!(!builds_a_status(other) && !picks_a_code(other), "{other}");
    }
}

/// `(name, first line, length)` of every function in production code.
fn functions(file: &Path) -> Vec<(String, usize, usize)> {
    let lines = production_lines(file);
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (start, line) = &lines[i];
        let Some(name) = fn_name(line) else {
            i += 1;
            continue;
        };
        // Find the body's opening brace (a signature can span lines; a
        // declaration without a body ends with `;`).
        let mut j = i;
        let mut depth = 0i32;
        let mut opened = false;
        'scan: while j < lines.len() {
            for ch in strip_literals(&lines[j].1).chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break 'scan,
                    _ => {}
                }
                if opened && depth == 0 {
                    break 'scan;
                }
            }
            j += 1;
        }
        if opened {
            out.push((name, *start, lines[j.min(lines.len() - 1)].0 - start + 1));
        }
        i += 1;
    }
    out
}

fn fn_name(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "fn")?;
    // Only declarations: every word before `fn` is a qualifier.
    let qualifiers = ["pub", "async", "const", "unsafe", "extern", "default"];
    if !words[..at]
        .iter()
        .all(|w| qualifiers.contains(w) || w.starts_with("pub("))
    {
        return None;
    }
    let name = words.get(at + 1)?;
    Some(first_name(name))
}

/// Drops string and char literal contents so their braces do not count.
fn strip_literals(line: &str) -> String {
    let mut out = String::new();
    let mut in_string = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if in_string => {
                chars.next();
            }
            '"' => in_string = !in_string,
            '\'' if !in_string => {
                // A char literal such as '{' or '\''; a lifetime has no
                // closing quote within three characters.
                let ahead: String = chars.clone().take(3).collect();
                if let Some(end) = ahead.find('\'') {
                    for _ in 0..=end {
                        chars.next();
                    }
                }
            }
            _ if in_string => {}
            _ => out.push(ch),
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_80_lines() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long = Vec::new();
    for file in &files {
        for (name, line, length) in functions(file) {
            let exempt = LONG_TABLES.iter().any(|(n, _)| *n == name);
            if length > MAX_FN_LINES && !exempt {
                long.push(format!(
                    "{}:{line}: fn {name} is {length} lines",
                    file.display()
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_length_checker_measures_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sample.rs");
    fs::write(
        &file,
        "pub async fn short(x: u8)\n    -> u8\n{\n    let s = \"}\";\n    x\n}\nfn declared();\n",
    )
    .unwrap();
    assert_eq!(functions(&file), [("short".to_owned(), 1, 6)]);
}

/// A `cargo update` or a dropped `[patch.crates-io]` would quietly swap the
/// patched sled for the release, and with it every durable write's cost;
/// nothing functional would fail.
#[test]
fn the_build_links_the_vendored_sled_with_its_fix() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lock = fs::read_to_string(root.join("Cargo.lock")).unwrap();
    let sled = lock
        .split("[[package]]")
        .find(|entry| entry.contains("\nname = \"sled\"\n"))
        .expect("sled in Cargo.lock");
    assert!(
        !sled.contains("source ="),
        "Cargo.lock takes sled from a registry, not from vendor/sled:{sled}"
    );
    let pool = fs::read_to_string(root.join("vendor/sled/src/threadpool.rs")).unwrap();
    assert!(
        pool.contains("self.cv.notify_one();") && !pool.contains("self.cv.notify_all();"),
        "vendor/sled's IO pool no longer wakes one thread per job (vendor/README.md)"
    );
}

/// Every module `module` may reach, itself included, through the walls.
fn reach(module: &str) -> std::collections::BTreeSet<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut next = vec![module.to_owned()];
    while let Some(m) = next.pop() {
        if seen.insert(m.clone()) {
            next.extend(allowed[m.as_str()].iter().map(|s| s.to_string()));
        }
    }
    seen
}

/// The fuzz crate compiles `crypto` from its own source files, beside the
/// modules it names (`fuzz/src/lib.rs`). A wall widened for crypto must
/// widen that list too, or the fuzz build breaks in CI; a module left on
/// the list after a wall narrowed would be fuzz-only code.
#[test]
fn the_fuzz_crate_builds_the_whole_of_what_crypto_reaches() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = fs::read_to_string(root.join("fuzz/src/lib.rs")).unwrap();
    let built: std::collections::BTreeSet<String> = lib
        .lines()
        .filter_map(|line| line.trim().strip_prefix("#[path = \"../../src/"))
        .map(|path| {
            let path = path.trim_end_matches("\"]");
            let path = path.strip_suffix("/mod.rs").unwrap_or(path);
            path.trim_end_matches(".rs").to_owned()
        })
        .collect();
    assert_eq!(
        built,
        reach("crypto"),
        "fuzz/src/lib.rs builds other modules than crypto may reach"
    );
}
