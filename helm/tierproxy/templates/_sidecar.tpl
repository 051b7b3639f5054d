{{/*
The tierproxy sidecar container, as one list item: under containers, or under
initContainers with restartPolicy: Always when sidecar.native is on.
*/}}
{{- define "tierproxy.sidecarContainer" -}}
{{- $metricsPort := int .Values.sidecar.metricsPort }}
- name: tierproxy
  image: {{ include "tierproxy.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  # Native sidecar: started before the app, stopped after it.
  restartPolicy: Always
  {{- end }}
  command:
    - tierproxy
    - serve
    - --host
    - 127.0.0.1
    - --port
    - {{ int .Values.sidecar.apiPort | quote }}
    - --metrics-port
    - {{ $metricsPort | quote }}
    - --config
    - /etc/tierproxy/config.toml
  ports:
    # The API (127.0.0.1) is deliberately not declared: nothing outside the pod may use it.
    - name: metrics
      containerPort: {{ $metricsPort }}
      protocol: TCP
  env:
    {{- include "tierproxy.secretEnv" . | trim | nindent 4 }}
    {{- with .Values.sidecar.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.sidecar.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # Probes use the metrics port: the API listens on 127.0.0.1, which the kubelet cannot reach.
  startupProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml .Values.sidecar.startupProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
    {{- toYaml .Values.sidecar.readinessProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
    {{- toYaml .Values.sidecar.livenessProbe | nindent 4 }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/tierproxy
      readOnly: true
    # The root filesystem is read-only; Python and tierproxy get a writable /tmp.
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* env of the app container: the sidecar's URL, the API token, then app.env. */}}
{{- define "tierproxy.appEnv" -}}
{{- with .Values.app.sidecarUrlEnv }}
- name: {{ . }}
  value: {{ printf "http://127.0.0.1:%d" (int $.Values.sidecar.apiPort) | quote }}
{{- end }}
{{- include "tierproxy.tokenEnv" . }}
{{- with .Values.app.env }}
{{ toYaml . }}
{{- end }}
{{- end }}
