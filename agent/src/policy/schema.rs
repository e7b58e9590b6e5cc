//! The JSON Schema of a policy file, generated from the raw serde types ([`raw`]) with
//! schemars, for editors (yaml-language-server) and CI linters. It describes the shape a
//! file must have (keys, types, keywords); the loader's validation (names, patterns,
//! ranges across fields, cross-file checks) stays the authority: a file the schema
//! accepts can still be refused by `policy check`, never the other way round.
//!
//! The schema is checked in as `packaging/policy.schema.json` and shipped in the package
//! (`/usr/share/scopegate/policy.schema.json`); a unit test keeps the file in sync.
#![forbid(unsafe_code)]

use schemars::generate::SchemaSettings;

use super::raw;

/// The schema's `$id`.
pub const SCHEMA_ID: &str = "https://scopegate.dev/schema/policy.schema.json";

/// The policy file schema as pretty-printed JSON (with a trailing newline).
pub fn json() -> String {
    let generator = SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<raw::PolicyFile>();
    schema.insert("$id".to_owned(), SCHEMA_ID.into());
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const CHECKED_IN: &str = "../packaging/policy.schema.json";

    #[test]
    fn the_checked_in_schema_is_in_sync_with_the_raw_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CHECKED_IN);
        let fresh = json();
        if std::env::var_os("SCOPEGATE_BLESS").is_some() {
            std::fs::write(&path, &fresh).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == fresh,
            "{} is stale: regenerate it with `SCOPEGATE_BLESS=1 cargo test -p scopegate --lib \
             policy::schema` (or `scopegate generate policy-schema`)",
            path.display()
        );
    }

    #[test]
    fn the_schema_names_every_key_and_denies_unknown_ones() {
        let v: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let text = v.to_string();
        for key in [
            "workload",
            "select",
            "egress",
            "dns",
            "allow_internal",
            "rules",
            "methods",
            "query",
            "headers",
            "json",
            "when",
            "timezone",
            "credential",
            "secret_file",
            "body_cap",
            "max_connections",
        ] {
            assert!(text.contains(&format!("\"{key}\"")), "{key} missing");
        }
        assert!(text.contains("\"additionalProperties\":false"), "{text}");
    }
}
