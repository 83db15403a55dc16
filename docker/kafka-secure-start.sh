#!/usr/bin/env bash
# Entrypoint of the kafka service in docker-compose.secure.yml (the apache/kafka image's own
# start script is bypassed: it cannot add SCRAM users when it formats the storage).
#
# 1. server.properties from the KAFKA_* variables (KAFKA_FOO_BAR -> foo.bar, as the image reads
#    them: "___" -> "-", "__" -> "_") plus the two JAAS lines, which hold the admin password
#    (read from the Docker secret), so the file lives in the container only, mode 0600.
# 2. On first start (no meta.properties in the data directory): format the storage with the SCRAM
#    users admin, linrec and reader (--add-scram, KIP-900), passwords from /run/secrets, through
#    a java @argfile so that no password shows in a process listing.
# 3. exec the broker.
set -euo pipefail

KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
SECRETS=${LINREC_SECRETS_DIR:-/run/secrets}
CONF=${LINREC_KAFKA_CONF_DIR:-/tmp/linrec-kafka}
DATA=${KAFKA_LOG_DIRS:?KAFKA_LOG_DIRS must name the data directory}
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
SCRAM=SCRAM-SHA-512
SCRAM_MODULE=org.apache.kafka.common.security.scram.ScramLoginModule
PLAIN_MODULE=org.apache.kafka.common.security.plain.PlainLoginModule

umask 077
mkdir -p "$CONF"

password() {  # the first line of the secret, as linrec-stream reads sasl_password_file
  local file=$SECRETS/$1 pw
  [[ -r $file ]] || { echo "kafka-secure-start: secret $file missing or unreadable (docker/make-secrets.sh)" >&2; exit 1; }
  IFS= read -r pw <"$file" || true
  pw=${pw%$'\r'}
  # It is quoted inside a JAAS line and an --add-scram argument, where " ] , would end it.
  [[ $pw =~ ^[A-Za-z0-9._~-]+$ ]] || { echo "kafka-secure-start: $file: empty, or a character other than A-Z a-z 0-9 . _ ~ -" >&2; exit 1; }
  printf '%s' "$pw"
}
ADMIN=$(password admin_password)

# --- 1. the broker's configuration -----------------------------------------------------------
{
  echo "# written by kafka-secure-start.sh from the KAFKA_* variables of the compose files"
  for var in $(compgen -e | sort); do
    case $var in
      KAFKA_HOME|KAFKA_OPTS|KAFKA_HEAP_OPTS|KAFKA_JVM_PERFORMANCE_OPTS|KAFKA_LOG4J_OPTS|KAFKA_JMX_OPTS|KAFKA_GC_LOG_OPTS|KAFKA_DEBUG) continue ;;
      KAFKA_*) ;;
      *) continue ;;
    esac
    key=${var#KAFKA_}
    key=${key,,}
    key=${key//___/-}
    key=${key//__/@}
    key=${key//_/.}
    echo "${key//@/_}=${!var}"
  done
  # The client listener: the broker reaches itself over it as admin (SCRAM).
  echo "listener.name.client.scram-sha-512.sasl.jaas.config=$SCRAM_MODULE required username=\"admin\" password=\"$ADMIN\";"
  # The controller listener (PLAIN: SCRAM cannot serve it): the broker logs in as admin, the
  # controller accepts the user_admin entry. No PLAINTEXT controller, so no ANONYMOUS super user.
  echo "listener.name.controller.plain.sasl.jaas.config=$PLAIN_MODULE required username=\"admin\" password=\"$ADMIN\" user_admin=\"$ADMIN\";"
} >"$CONF/server.properties"

# The healthcheck's client settings (kafka-broker-api-versions.sh --command-config).
cat >"$CONF/client.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=$SCRAM
sasl.jaas.config=$SCRAM_MODULE required username="admin" password="$ADMIN";
ssl.truststore.type=PEM
ssl.truststore.location=$SECRETS/ca.pem
EOF

# --- 2. first start: format the storage with the SCRAM users ---------------------------------
if [[ ! -e $DATA/meta.properties ]]; then
  echo "kafka-secure-start: formatting $DATA with SCRAM users admin, linrec, reader"
  cluster_id=$("$KAFKA_HOME/bin/kafka-storage.sh" random-uuid)
  {
    echo "kafka.tools.StorageTool format --cluster-id $cluster_id --config $CONF/server.properties"
    for user in admin linrec reader; do
      echo "--add-scram $SCRAM=[name=$user,password=$(password "${user}_password")]"
    done
  } >"$CONF/format.args"
  status=0
  # (stdout: the bootstrap metadata, SCRAM salts and keys among it: not for the log)
  "$JAVA" -cp "$KAFKA_HOME/libs/*" "@$CONF/format.args" >/dev/null || status=$?
  rm -f "$CONF/format.args"
  [[ $status -eq 0 ]] || { echo "kafka-secure-start: formatting $DATA failed (exit $status)" >&2; exit "$status"; }
fi

# --- 3. the broker -----------------------------------------------------------------------------
exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$CONF/server.properties"
