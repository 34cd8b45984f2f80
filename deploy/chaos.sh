#!/usr/bin/env bash
# Faults against the docker compose cluster, in rounds, each logged with timestamps.
#
# The fault names and their meaning are those of `python -m loadtest chaos`, so the two tell one story:
#   kill             SIGKILL the leader's container, wait for a new leader, start it again
#   pause            `docker compose pause` the leader longer than the TTL, then unpause
#   partition        disconnect the leader's container from its networks, hold, reconnect
#   restart-backend  restart the lock server (one etcd member at random, or redis, or postgres)
#   term             SIGTERM the leader (graceful handoff), then start it again
#   step-down        POST /admin/leader/step-down on the leader (BATON_ADMIN_TOKEN): a handoff through the API
# Each fault is appended to a JSONL chaos log (start and end lines, the shape loadtest/chaos.py writes),
# which `python -m loadtest check --chaos-log` reads. The leader is found through the nodes' /status on
# their published ports. Needs bash, curl and docker (compose v2 plugin or docker-compose).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KNOWN_FAULTS="kill pause partition restart-backend term step-down"
PROG=chaos.sh

usage() {
    cat <<EOF
usage: deploy/chaos.sh [--rounds N] [--faults LIST] [--interval SECONDS] [--hold SECONDS] [--aim SECONDS]
                       [--backend etcd|redis|postgres] [--ports LIST] [--log FILE]

Each round applies every fault in LIST once to the compose cluster, pausing --interval seconds
after each fault; the script stops by itself after the last round.

  --rounds N         rounds to run (default 3)
  --faults LIST      comma-separated, from: ${KNOWN_FAULTS// /, } (default kill,pause,partition,restart-backend)
  --interval SECONDS pause after each fault (default 30)
  --hold SECONDS     how long pause and partition last (default 1.5 x BATON_LEASE_TTL + 0.5)
  --aim SECONDS      fire each fault SECONDS before a probe fire time (2000-01-01 UTC + k x BATON_PROBE_INTERVAL),
                     as python -m loadtest chaos --aim before-fire:SECONDS; docker adds its own delay
  --backend NAME     what restart-backend restarts (default: from BATON_LOCK_URL in deploy/.env, else etcd)
  --ports LIST       the nodes' published API ports, node-1 first (default 8001,8002,8003)
  --log FILE         chaos log to append to (default deploy/data/chaos.jsonl)
EOF
}

die_usage() {
    echo "$PROG: $1 (see --help)" >&2
    exit 2
}

die() {
    echo "$PROG: $1" >&2
    exit 1
}

# A setting from the environment, else from deploy/.env, else the default.
setting() {
    local name=$1 default=$2 value=""
    if [ -n "${!name:-}" ]; then
        value=${!name}
    elif [ -f "$HERE/.env" ]; then
        value=$(sed -n "s/^${name}=//p" "$HERE/.env" | tail -n 1)
    fi
    echo "${value:-$default}"
}

is_number() {
    [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]
}

rounds=3
faults=kill,pause,partition,restart-backend
interval=30
hold=""
aim=""
backend=""
ports=8001,8002,8003
log="$HERE/data/chaos.jsonl"

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --rounds | --faults | --interval | --hold | --aim | --backend | --ports | --log)
            [ $# -ge 2 ] || die_usage "$1 needs a value"
            case $1 in
                --rounds) rounds=$2 ;;
                --faults) faults=$2 ;;
                --interval) interval=$2 ;;
                --hold) hold=$2 ;;
                --aim) aim=$2 ;;
                --backend) backend=$2 ;;
                --ports) ports=$2 ;;
                --log) log=$2 ;;
            esac
            shift 2 ;;
        *) die_usage "unknown argument '$1'" ;;
    esac
done

[[ $rounds =~ ^[1-9][0-9]*$ ]] || die_usage "--rounds must be a positive integer, got '$rounds'"
is_number "$interval" || die_usage "--interval must be a number of seconds, got '$interval'"
ttl=$(setting BATON_LEASE_TTL 10)
is_number "$ttl" || die_usage "BATON_LEASE_TTL must be a number of seconds, got '$ttl'"
[ -n "$hold" ] || hold=$(awk -v t="$ttl" 'BEGIN { printf "%.1f", t * 1.5 + 0.5 }')
is_number "$hold" || die_usage "--hold must be a number of seconds, got '$hold'"
[ -z "$aim" ] || is_number "$aim" || die_usage "--aim must be a number of seconds, got '$aim'"
probe_interval=$(setting BATON_PROBE_INTERVAL 1)
is_number "$probe_interval" || die_usage "BATON_PROBE_INTERVAL must be a number of seconds, got '$probe_interval'"
admin_token=$(setting BATON_ADMIN_TOKEN "")
IFS=, read -r -a fault_list <<<"$faults"
[ "${#fault_list[@]}" -gt 0 ] || die_usage "--faults is empty"
for f in "${fault_list[@]}"; do
    case " $KNOWN_FAULTS " in
        *" $f "*) ;;
        *) die_usage "unknown fault '$f'; expected some of ${KNOWN_FAULTS// /, }" ;;
    esac
done
IFS=, read -r -a port_list <<<"$ports"
[ "${#port_list[@]}" -gt 0 ] || die_usage "--ports is empty"
for p in "${port_list[@]}"; do
    [[ $p =~ ^[0-9]+$ ]] || die_usage "--ports must be comma-separated port numbers, got '$ports'"
done
if [ -z "$backend" ]; then
    case $(setting BATON_LOCK_URL etcd://) in
        redis* ) backend=redis ;;
        postgres*) backend=postgres ;;
        *) backend=etcd ;;
    esac
fi
case $backend in
    etcd | redis | postgres) ;;
    *) die_usage "--backend must be etcd, redis or postgres, got '$backend'" ;;
esac

command -v curl >/dev/null || die "curl is not installed"
command -v docker >/dev/null || die "docker is not installed"
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose -f "$HERE/docker-compose.yml")
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose -f "$HERE/docker-compose.yml")
else
    die "neither 'docker compose' nor docker-compose is available"
fi
mkdir -p "$(dirname "$log")"

# Seconds since the epoch, with a fraction where date supports %N (GNU), whole seconds otherwise.
now_s() {
    local t
    t=$(date +%s.%N)
    case $t in *N) date +%s ;; *) echo "$t" ;; esac
}

now_iso() {
    local t
    t=$(date -u +%Y-%m-%dT%H:%M:%S.%6N)
    case $t in *N) date -u +%Y-%m-%dT%H:%M:%S+00:00 ;; *) echo "$t+00:00" ;; esac
}

elapsed_since() {
    awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.3f", b - a }'
}

say() {
    echo "[$(now_iso)] $*"
}

# log_event FAULT TARGET PHASE [raw JSON members to add, starting with a comma]
log_event() {
    printf '{"ts": "%s", "fault": "%s", "target": "%s", "phase": "%s", "source": "chaos.sh"%s}\n' \
        "$(now_iso)" "$1" "$2" "$3" "${4:-}" >>"$log"
}

# The node id of whichever node reports itself leader on its /status, or nothing.
current_leader() {
    local port body
    for port in "${port_list[@]}"; do
        body=$(curl -fsS --max-time 1 "http://127.0.0.1:$port/status" 2>/dev/null) || continue
        if [[ $body =~ \"role\":\ ?\"leader\" ]] && [[ $body =~ ^\{\"node_id\":\ ?\"([^\"]+)\" ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
    done
}

# wait_leader EXCLUDE TIMEOUT: print a leader other than EXCLUDE once one appears; fail after TIMEOUT s.
wait_leader() {
    local exclude=$1 timeout=$2 start leader
    start=$(now_s)
    while awk -v e="$(elapsed_since "$start")" -v t="$timeout" 'BEGIN { exit !(e < t) }'; do
        leader=$(current_leader)
        if [ -n "$leader" ] && [ "$leader" != "$exclude" ]; then
            echo "$leader"
            return 0
        fi
        sleep 0.5
    done
    return 1
}

container_of() {
    "${compose[@]}" ps -q "$1"
}

# The published API port of node-N (--ports lists node-1 first).
port_of() {
    echo "${port_list[$((${1##*-} - 1))]}"
}

# Sleep until --aim seconds before the next probe fire time at least a second away; print that fire time.
wait_for_aim() {
    local wait fire
    read -r wait fire < <(awk -v now="$(now_s)" -v i="$probe_interval" -v a="$aim" 'BEGIN {
        epoch = 946684800; f = epoch + (int((now - epoch) / i) + 1) * i
        while (f - a - now < 1) f += i
        printf "%.6f %.6f\n", f - a - now, f }')
    sleep "$wait"
    date -u -d "@$fire" +%Y-%m-%dT%H:%M:%S.%6N+00:00
}

# Undo a pause or a partition if the script is stopped in the middle of one.
restore_cmds=()
restore() {
    local cmd
    for cmd in "${restore_cmds[@]+"${restore_cmds[@]}"}"; do
        eval "$cmd" >/dev/null 2>&1 || true
    done
    restore_cmds=()
}
trap restore EXIT
trap 'exit 130' INT TERM

sleep_rest() {
    local since=$1 total=$2 rest
    rest=$(awk -v e="$(elapsed_since "$since")" -v t="$total" 'BEGIN { r = t - e; printf "%.3f", (r > 0 ? r : 0) }')
    sleep "$rest"
}

run_fault() {
    local fault=$1 target="" leader new="" failover="null" start extra="" member cid nets net
    leader=$(wait_leader "" 90) || die "no node reports itself leader on ports $ports"
    if [ "$fault" = restart-backend ]; then
        target=backend
    else
        target=$leader
    fi
    local aimed=""
    if [ -n "$aim" ]; then
        aimed=", \"aim\": \"before-fire:$aim\", \"fire_time\": \"$(wait_for_aim)\""
    fi
    start=$(now_s)
    log_event "$fault" "$target" start "$aimed"
    case $fault in
        kill)
            say "kill: SIGKILL $leader (the leader)"
            "${compose[@]}" kill -s SIGKILL "$leader" >/dev/null
            new=$(wait_leader "$leader" 90) || die "no new leader within 90s after killing $leader"
            failover=$(elapsed_since "$start")
            "${compose[@]}" start "$leader" >/dev/null
            ;;
        term)
            say "term: SIGTERM $leader (the leader), graceful handoff"
            "${compose[@]}" stop -t 20 "$leader" >/dev/null
            new=$(wait_leader "$leader" 90) || die "no new leader within 90s after stopping $leader"
            failover=$(elapsed_since "$start")
            "${compose[@]}" start "$leader" >/dev/null
            ;;
        step-down)
            [ -n "$admin_token" ] || die "step-down needs BATON_ADMIN_TOKEN (deploy/.env or the environment)"
            say "step-down: POST /admin/leader/step-down on $leader (the leader), graceful handoff"
            printf 'Authorization: Bearer %s\n' "$admin_token" |
                curl -fsS --max-time 30 -X POST -H @- "http://127.0.0.1:$(port_of "$leader")/admin/leader/step-down" \
                    >/dev/null || die "step-down on $leader failed"
            new=$(wait_leader "$leader" 90) || die "no new leader within 90s after $leader stepped down"
            failover=$(elapsed_since "$start")
            ;;
        pause)
            say "pause: freeze $leader (the leader) for ${hold}s"
            "${compose[@]}" pause "$leader" >/dev/null
            restore_cmds=("$(printf '%q ' "${compose[@]}") unpause $leader")
            new=$(wait_leader "$leader" 120) || { restore; die "no new leader within 120s after pausing $leader"; }
            failover=$(elapsed_since "$start")
            sleep_rest "$start" "$hold"
            "${compose[@]}" unpause "$leader" >/dev/null
            restore_cmds=()
            extra=", \"held_s\": $hold"
            ;;
        partition)
            cid=$(container_of "$leader")
            [ -n "$cid" ] || die "no container for service $leader"
            nets=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$cid")
            say "partition: disconnect $leader (the leader) from ${nets% } for ${hold}s"
            for net in $nets; do
                docker network disconnect "$net" "$cid"
                restore_cmds+=("docker network connect --alias $leader $net $cid")
            done
            new=$(wait_leader "$leader" 120) || { restore; die "no new leader within 120s after cutting off $leader"; }
            failover=$(elapsed_since "$start")
            sleep_rest "$start" "$hold"
            restore
            extra=", \"held_s\": $hold"
            ;;
        restart-backend)
            case $backend in
                etcd) member="etcd-$((RANDOM % 3 + 1))" ;;
                *) member=$backend ;;
            esac
            say "restart-backend: restart $member"
            "${compose[@]}" restart -t 10 "$member" >/dev/null
            new=$(wait_leader "" 120) || die "no leader within 120s after restarting $member"
            extra=", \"member\": \"$member\""
            ;;
    esac
    log_event "$fault" "$target" end \
        ", \"new_leader\": \"$new\", \"failover_s\": $failover, \"took_s\": $(elapsed_since "$start")$extra"
    say "$fault: done; leader now $new$([ "$failover" = null ] || echo ", failover ${failover}s")"
}

say "chaos: $rounds round(s) of ${fault_list[*]} against the $backend backend; hold ${hold}s, interval ${interval}s"
say "chaos log: $log"
total=$((rounds * ${#fault_list[@]}))
done_count=0
for ((round = 1; round <= rounds; round++)); do
    for fault in "${fault_list[@]}"; do
        say "round $round/$rounds: $fault"
        run_fault "$fault"
        done_count=$((done_count + 1))
        if [ "$done_count" -lt "$total" ]; then
            sleep "$interval"
        fi
    done
done
say "chaos: done, $total fault(s). Judge the run from the collector's records:"
echo "  python -m loadtest check --records $HERE/data/probes.jsonl --chaos-log $log" \
    "--jobs $(setting BATON_PROBE_JOBS 5) --interval $(setting BATON_PROBE_INTERVAL 1)" \
    "--misfire-grace $(setting BATON_MISFIRE_GRACE 300)"
