{{/*
The Redis URL. Given whole (redis.url into the chart's Secret, or redis.existingSecret), or
built from the parts of one topology:

  redis[s]://[user:pass@]host:port/db
  redis[s]+sentinel://[user:pass@]h1:26379,h2:26379/<master>/<db>[?sentinel_password=...]
  redis[s]+cluster://[user:pass@]n1:6379,n2:6379

with the TLS options in the query when redis.tls.enabled. Inline passwords are URL-encoded and
the built URL goes into the chart's Secret. A password from an existing Secret cannot be
encoded by the chart: it reaches the container as REDIS_PASSWORD / REDIS_SENTINEL_PASSWORD and
the kubelet substitutes it into the URL ($(VAR) in an env value), which is then not secret.
*/}}

{{/* Where the CA, client certificate and key of redis.tls.secretName are mounted. */}}
{{- define "tierproxy.redisTlsDir" -}}
/etc/tierproxy-tls/redis
{{- end }}

{{/* Which source the URL comes from: url, existingSecret or parts (empty: none given). */}}
{{- define "tierproxy.redisSource" -}}
{{- $r := .Values.redis }}
{{- if $r.url }}url
{{- else if $r.existingSecret }}existingSecret
{{- else if or $r.host $r.sentinel.hosts $r.cluster.nodes }}parts
{{- end }}
{{- end }}

{{/* True (non-empty) when a password of the parts comes from an existing Secret. */}}
{{- define "tierproxy.redisPasswordRefs" -}}
{{- if eq (include "tierproxy.redisSource" .) "parts" }}
{{- if or .Values.redis.passwordSecret.name .Values.redis.sentinel.passwordSecret.name }}true{{ end }}
{{- end }}
{{- end }}

{{/* Percent-encoding for the user info and path of a URL (urlquery turns spaces into +). */}}
{{- define "tierproxy.urlEncode" -}}
{{- urlquery . | replace "+" "%20" }}
{{- end }}

{{/* The URL built from the parts. */}}
{{- define "tierproxy.redisBuiltUrl" -}}
{{- $r := .Values.redis }}
{{- $scheme := ternary "rediss" "redis" $r.tls.enabled }}
{{- $password := ternary "$(REDIS_PASSWORD)" (include "tierproxy.urlEncode" $r.password) (not (empty $r.passwordSecret.name)) }}
{{- $auth := "" }}
{{- if or $r.username $password }}
{{- $auth = printf "%s%s@" (include "tierproxy.urlEncode" $r.username) (ternary (printf ":%s" $password) "" (not (empty $password))) }}
{{- end }}
{{- $query := include "tierproxy.redisTlsQuery" . | fromYamlArray }}
{{- $where := "" }}
{{- if $r.sentinel.hosts }}
{{- $scheme = printf "%s+sentinel" $scheme }}
{{- $where = printf "%s/%s/%d" (join "," $r.sentinel.hosts) (include "tierproxy.urlEncode" $r.sentinel.masterName) (int $r.db) }}
{{- if $r.sentinel.passwordSecret.name }}
{{- $query = append $query "sentinel_password=$(REDIS_SENTINEL_PASSWORD)" }}
{{- else if $r.sentinel.password }}
{{- $query = append $query (printf "sentinel_password=%s" (urlquery $r.sentinel.password)) }}
{{- end }}
{{- else if $r.cluster.nodes }}
{{- $scheme = printf "%s+cluster" $scheme }}
{{- $where = join "," $r.cluster.nodes }}
{{- else }}
{{- $where = printf "%s:%d/%d" $r.host (int $r.port) (int $r.db) }}
{{- end }}
{{- printf "%s://%s%s" $scheme $auth $where }}{{ with $query }}?{{ join "&" . }}{{ end }}
{{- end }}

{{/* TLS options of the built URL, as a YAML list of name=value. */}}
{{- define "tierproxy.redisTlsQuery" -}}
{{- $tls := .Values.redis.tls }}
{{- if $tls.enabled }}
- ssl_cert_reqs={{ $tls.certReqs }}
- ssl_check_hostname={{ ternary "true" "false" $tls.checkHostname }}
{{- if $tls.secretName }}
- ssl_ca_certs={{ include "tierproxy.redisTlsDir" . }}/ca.crt
{{- if $tls.certKey }}
- ssl_certfile={{ include "tierproxy.redisTlsDir" . }}/tls.crt
- ssl_keyfile={{ include "tierproxy.redisTlsDir" . }}/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The URL that goes into the chart's Secret (empty: none). */}}
{{- define "tierproxy.redisSecretUrl" -}}
{{- $source := include "tierproxy.redisSource" . }}
{{- if eq $source "url" }}{{ .Values.redis.url }}
{{- else if and (eq $source "parts") (not (include "tierproxy.redisPasswordRefs" .)) }}
{{- include "tierproxy.redisBuiltUrl" . }}
{{- end }}
{{- end }}

{{/* env entries of the sidecar for Redis. The password variables come first: $(VAR) only
sees variables defined before it. */}}
{{- define "tierproxy.redisEnv" -}}
{{- $r := .Values.redis }}
{{- $source := include "tierproxy.redisSource" . }}
{{- if include "tierproxy.redisPasswordRefs" . }}
{{- with $r.passwordSecret.name }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $r.passwordSecret.key }}
{{- end }}
{{- with $r.sentinel.passwordSecret.name }}
- name: REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $r.sentinel.passwordSecret.key }}
{{- end }}
- name: TIERPROXY_REDIS_URL
  value: {{ include "tierproxy.redisBuiltUrl" . | quote }}
{{- else if $source }}
- name: TIERPROXY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $r.existingSecret | default (include "tierproxy.secretName" .) }}
      key: {{ ternary $r.existingSecretKey "redis-url" (eq $source "existingSecret") }}
{{- end }}
{{- end }}

{{/* The TLS Secret's volume (a list item; empty without redis.tls.secretName). Files get
fixed names, whatever the keys; 0440 with the pod's fsGroup, as the private key needs. */}}
{{- define "tierproxy.redisTlsVolume" -}}
{{- $tls := .Values.redis.tls }}
{{- if and $tls.enabled $tls.secretName }}
- name: redis-tls
  secret:
    secretName: {{ $tls.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $tls.caKey }}
        path: ca.crt
      {{- if $tls.certKey }}
      - key: {{ $tls.certKey }}
        path: tls.crt
      - key: {{ $tls.keyKey }}
        path: tls.key
      {{- end }}
{{- end }}
{{- end }}

{{- define "tierproxy.redisTlsMount" -}}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.secretName }}
- name: redis-tls
  mountPath: {{ include "tierproxy.redisTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Every rule of the Redis values, each failure naming the values to fix. */}}
{{- define "tierproxy.validateRedis" -}}
{{- $r := .Values.redis }}
{{- $given := list }}
{{- range $name, $set := dict "redis.url" $r.url "redis.existingSecret" $r.existingSecret "redis.host" $r.host "redis.sentinel.hosts" $r.sentinel.hosts "redis.cluster.nodes" $r.cluster.nodes }}
{{- if $set }}{{ $given = append $given $name }}{{ end }}
{{- end }}
{{- if gt (len $given) 1 }}
{{- fail (printf "tierproxy: set only one of redis.url, redis.existingSecret, redis.host, redis.sentinel.hosts, redis.cluster.nodes (got %s)" (join ", " (sortAlpha $given))) }}
{{- end }}
{{- $source := include "tierproxy.redisSource" . }}
{{- if eq $source "url" }}
{{- $schemes := list "redis://" "rediss://" "unix://" "redis+sentinel://" "rediss+sentinel://" "redis+cluster://" "rediss+cluster://" }}
{{- $ok := false }}
{{- range $schemes }}{{ if hasPrefix . $r.url }}{{ $ok = true }}{{ end }}{{ end }}
{{- if not $ok }}
{{- fail (printf "tierproxy: redis.url must start with one of %s (an external server; embedded servers are for development only)" (join ", " $schemes)) }}
{{- end }}
{{- if and $r.tls.enabled (not (hasPrefix "rediss" $r.url)) }}
{{- fail "tierproxy: redis.tls.enabled needs a rediss://, rediss+sentinel:// or rediss+cluster:// redis.url" }}
{{- end }}
{{- end }}
{{- if and (has $source (list "url" "existingSecret")) (or $r.username $r.password $r.passwordSecret.name $r.sentinel.password $r.sentinel.passwordSecret.name) }}
{{- fail (printf "tierproxy: redis.username, redis.password and their Secrets go with the parts (redis.host, redis.sentinel.hosts, redis.cluster.nodes); with redis.%s the URL carries its own credentials" $source) }}
{{- end }}
{{- if and $r.password $r.passwordSecret.name }}
{{- fail "tierproxy: set redis.password or redis.passwordSecret.name, not both" }}
{{- end }}
{{- if and $r.sentinel.password $r.sentinel.passwordSecret.name }}
{{- fail "tierproxy: set redis.sentinel.password or redis.sentinel.passwordSecret.name, not both" }}
{{- end }}
{{- if and (include "tierproxy.redisPasswordRefs" .) (or $r.password $r.sentinel.password) }}
{{- fail "tierproxy: with a redis password from a Secret the URL is a plain env value: give the other password from a Secret too (redis.passwordSecret, redis.sentinel.passwordSecret), not inline" }}
{{- end }}
{{- if and (or $r.sentinel.password $r.sentinel.passwordSecret.name) (not $r.sentinel.hosts) }}
{{- fail "tierproxy: redis.sentinel.password and redis.sentinel.passwordSecret need redis.sentinel.hosts" }}
{{- end }}
{{- if and $r.sentinel.hosts (not $r.sentinel.masterName) }}
{{- fail "tierproxy: redis.sentinel.hosts needs redis.sentinel.masterName (the master the sentinels monitor)" }}
{{- end }}
{{- if and $r.cluster.nodes (ne (int $r.db) 0) }}
{{- fail (printf "tierproxy: redis.db must be 0 with redis.cluster.nodes (a Redis Cluster has only database 0), not %d" (int $r.db)) }}
{{- end }}
{{- include "tierproxy.validateRedisTls" . }}
{{- end }}

{{- define "tierproxy.validateRedisTls" -}}
{{- $tls := .Values.redis.tls }}
{{- if and $tls.secretName (not $tls.enabled) }}
{{- fail "tierproxy: redis.tls.secretName is set but redis.tls.enabled is false" }}
{{- end }}
{{- if ne (empty $tls.certKey) (empty $tls.keyKey) }}
{{- fail "tierproxy: redis.tls.certKey and redis.tls.keyKey go together (the client certificate and its key)" }}
{{- end }}
{{- if and $tls.certKey (not $tls.secretName) }}
{{- fail "tierproxy: redis.tls.certKey needs redis.tls.secretName (the Secret holding the client certificate)" }}
{{- end }}
{{- if and $tls.enabled (eq $tls.certReqs "none") $tls.checkHostname }}
{{- fail "tierproxy: redis.tls.certReqs none needs redis.tls.checkHostname false (a host name cannot be checked without verifying the certificate)" }}
{{- end }}
{{- end }}

{{/* One line for NOTES.txt: the topology and where the URL comes from (no password). */}}
{{- define "tierproxy.redisSummary" -}}
{{- $r := .Values.redis }}
{{- $source := include "tierproxy.redisSource" . }}
{{- $tls := ternary ", TLS" "" $r.tls.enabled }}
{{- if eq $source "existingSecret" }}the URL in Secret {{ $r.existingSecret }} (key {{ $r.existingSecretKey }}){{ $tls }}
{{- else if eq $source "url" }}the URL given in redis.url (in Secret {{ include "tierproxy.secretName" . }}){{ $tls }}
{{- else if $r.sentinel.hosts }}Sentinel master "{{ $r.sentinel.masterName }}" via {{ join ", " $r.sentinel.hosts }}{{ $tls }}
{{- else if $r.cluster.nodes }}Cluster via {{ join ", " $r.cluster.nodes }}{{ $tls }}
{{- else }}{{ $r.host }}:{{ int $r.port }} db {{ int $r.db }}{{ $tls }}
{{- end }}
{{- end }}
