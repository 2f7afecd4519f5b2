//! Throw-away certificates for mTLS tests (openssl, which `make test` installs): a CA, a server
//! certificate for 127.0.0.1 / localhost, and one client certificate per SPIFFE ID, the way Istio's
//! workload certificates carry it (a URI SAN).

use std::path::Path;

/// Write `ca.crt`, `srv.crt` / `srv.key` and, for each `(name, spiffe_id)`, `<name>.crt` / `<name>.key`
/// into `dir`.
pub fn spiffe_pki(dir: &Path, clients: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut script = String::from(
        "set -e\n\
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=test-ca 2>/dev/null\n\
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost 2>/dev/null\n\
         printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > srv.ext\n\
         openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 1 -extfile srv.ext 2>/dev/null\n",
    );
    for (name, spiffe) in clients {
        script.push_str(&format!(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name} 2>/dev/null\n\
             printf 'subjectAltName=URI:{spiffe}' > {name}.ext\n\
             openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {name}.crt -days 1 -extfile {name}.ext 2>/dev/null\n"
        ));
    }
    let st = std::process::Command::new("sh").arg("-c").arg(script).current_dir(dir).status()?;
    anyhow::ensure!(st.success(), "openssl failed making the test PKI");
    Ok(())
}
