#!/usr/bin/env bash
# The Docker secrets of docker-compose.secure.yml, made once (existing files are kept):
#   docker/make-secrets.sh [DIR]            DIR defaults to docker/secrets (git-ignored)
#
#   ca.pem            the CA certificate the clients trust (LINREC_SSL_CAFILE)
#   broker.pem        the broker's private key and certificate (Kafka's PEM key store), naming
#                     kafka (the compose host name), localhost and 127.0.0.1
#   admin.password    the SCRAM users' passwords (hex: they go into JAAS lines unescaped)
#   linrec.password
#   reader.password
#
# As `linrec-stream kafka start --secure` does: P-256 keys, and the CA's key is deleted once it
# has signed the broker's certificate. Passwords are written into the broker's storage when it is
# first formatted: after changing them, recreate its volume (docker compose ... down -v).
set -euo pipefail

dir=${1:-"$(cd "$(dirname "$0")" && pwd)/secrets"}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"

for user in admin linrec reader; do
  [[ -s $dir/$user.password ]] || openssl rand -hex 24 >"$dir/$user.password"
done

if [[ ! -e $dir/ca.pem || ! -e $dir/broker.pem ]]; then
  work=$(mktemp -d "$dir/.work.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  key=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${key[@]}" -keyout "$work/ca.key" -out "$work/ca.pem" -days 3650 \
    -subj "/CN=linrec-stream compose CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
  openssl req -new "${key[@]}" -keyout "$work/broker.key" -out "$work/broker.csr" -subj "/CN=kafka" 2>/dev/null
  cat >"$work/broker.ext" <<'EOF'
subjectAltName=DNS:kafka,DNS:localhost,IP:127.0.0.1
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
EOF
  openssl x509 -req -in "$work/broker.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$work/broker.ext" -out "$work/broker.crt" 2>/dev/null
  cat "$work/broker.key" "$work/broker.crt" >"$work/broker.pem"
  mv "$work/broker.pem" "$dir/broker.pem"
  mv "$work/ca.pem" "$dir/ca.pem"  # last: its presence means the pair is complete
fi

# Docker bind-mounts each secret with the mode it has here, and the containers' users (the
# broker's appuser, uid 1000; the image's linrec, uid 10001) are not you: the files are readable
# by all, the directory (mode 0700) keeps the other users of this machine out.
chmod 644 "$dir"/*.pem "$dir"/*.password
echo "Docker secrets in $dir: ca.pem broker.pem admin.password linrec.password reader.password"
