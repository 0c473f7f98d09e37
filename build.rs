//! Tells the daemon which `phonenumber` it was built with (from Cargo.lock): phone readings
//! and row hashes remembered under another version are read again, since new metadata can
//! read a phone differently.

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock")
        .expect("Cargo.lock is needed to know the phonenumber version (build with --locked)");
    let version =
        locked_version(&lock, "phonenumber").expect("Cargo.lock names no phonenumber package");
    println!("cargo:rustc-env=PHONENUMBER_VERSION={version}");
}

/// The version of a package in a Cargo.lock: the `version` line after its `name` line.
fn locked_version<'a>(lock: &'a str, package: &str) -> Option<&'a str> {
    let name = format!("name = \"{package}\"");
    let mut lines = lock.lines().skip_while(|l| l.trim() != name);
    lines.next()?;
    lines
        .next()?
        .trim()
        .strip_prefix("version = \"")?
        .strip_suffix('"')
}
