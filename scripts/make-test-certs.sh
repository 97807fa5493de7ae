#!/usr/bin/env bash
# Make a throwaway CA, server and client certificate in qemu's layout
# (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
# client-key.pem) in DIR, for TLS tests. Usage: make-test-certs.sh DIR
set -euo pipefail
dir=${1:?usage: make-test-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
cat > ca.cnf <<'CNF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = nbd-cbw test CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
cat > leaf.cnf <<'CNF'
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
CNF
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout ca-key.pem -out ca-cert.pem -config ca.cnf 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout "$who-key.pem" -out "$who.csr" -subj "/CN=localhost/O=nbd-cbw test $who" 2>/dev/null
  openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -extfile leaf.cnf -extensions "$who" -out "$who-cert.pem" 2>/dev/null
done
chmod 600 ./*-key.pem
rm -f ./*.csr ./*.srl ca.cnf leaf.cnf
