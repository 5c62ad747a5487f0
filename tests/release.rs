//! What a release carries besides code must agree with the code: the versions in the PGXN
//! metadata and the changelog, and the licence the crate declares.

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn file(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn pgxn_metadata_names_this_release() {
    let meta: serde_json::Value = serde_json::from_str(&file("META.json")).unwrap();
    assert_eq!(meta["name"], "webhook_outbox");
    assert_eq!(meta["version"], VERSION);
    assert_eq!(meta["provides"]["webhook_outbox"]["version"], VERSION);
    assert_eq!(meta["license"], "postgresql");
    for key in ["abstract", "maintainer", "meta-spec"] {
        assert!(!meta[key].is_null(), "META.json needs {key}");
    }
}

#[test]
fn the_changelog_describes_this_release_and_every_upgrade_script_has_an_entry() {
    let changelog = file("CHANGELOG.md");
    assert!(
        changelog.contains(&format!("## {VERSION} ")),
        "CHANGELOG.md has no entry for {VERSION}"
    );
    for entry in
        std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql")).unwrap()
    {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(to) = name
            .strip_prefix("webhook_outbox--")
            .and_then(|n| n.strip_suffix(".sql"))
            .and_then(|n| n.split_once("--"))
            .map(|(_, to)| to.to_string())
        {
            assert!(
                changelog.contains(&format!("## {to} ")),
                "CHANGELOG.md has no entry for {to} ({name})"
            );
        }
    }
}

#[test]
fn the_licence_file_is_the_one_the_crate_declares() {
    assert!(file("Cargo.toml").contains("license = \"PostgreSQL\""));
    assert!(file("LICENSE").starts_with("PostgreSQL License"));
}
