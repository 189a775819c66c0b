{{/* The proxy's pod template, the same for one proxy on its file
(Deployment) and several on etcd (StatefulSet); with etcd it also gets the
placement settings, a preStop pause and anti-affinity. */}}
{{- define "tensor-wasm.proxyPodTemplate" -}}
{{- $fullname := include "tensor-wasm.fullname" . -}}
{{- $secret := include "tensor-wasm.secretName" . -}}
{{- $placement := include "tensor-wasm.placement" . -}}
{{- $replicas := int .Values.proxy.replicas -}}
metadata:
  labels:
    {{- include "tensor-wasm.selector" . | nindent 4 }}
    app.kubernetes.io/component: proxy
  annotations:
    prometheus.io/scrape: "true"
    prometheus.io/port: "8080"
    prometheus.io/path: /metrics
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- if $placement }}
  # The preStop pause (5 s), then the proxy's own grace period (5 s) for
  # the requests it has, then its etcd lease is revoked.
  {{- end }}
  terminationGracePeriodSeconds: 30
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: proxy
      image: {{ include "tensor-wasm.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["proxy"]
      env:
        - name: TENSOR_WASM_PROXY_LISTEN
          value: "0.0.0.0:8080"
        - name: TENSOR_WASM_ADMIN_LISTEN
          value: "0.0.0.0:9090"
        - name: TENSOR_WASM_STATE_DIR
          value: /var/lib/tensor-wasm/proxy
        - name: TENSOR_WASM_API_TOKENS_FILE
          value: /etc/tensor-wasm/secrets/api-tokens
        - name: TENSOR_WASM_INTERNAL_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: internal-token
        - name: TENSOR_WASM_ADMIN_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: admin-token
        - name: TENSOR_WASM_EXECUTOR_DNS
          value: {{ printf "%s-executors.%s.svc.%s:7070" $fullname .Release.Namespace .Values.clusterDomain | quote }}
        {{- with $placement }}
        # Every proxy of the release shares the placement table in etcd.
        - name: TENSOR_WASM_PLACEMENT
          value: {{ . | quote }}
        {{- end }}
        {{- if and $placement $.Values.etcd.auth.user }}
        - name: TENSOR_WASM_ETCD_USER
          value: {{ $.Values.etcd.auth.user | quote }}
        - name: TENSOR_WASM_ETCD_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ $.Values.etcd.auth.passwordSecret | default $secret }}
              key: {{ $.Values.etcd.auth.passwordKey }}
        {{- end }}
        {{- if and $placement $.Values.etcd.tls.caSecret }}
        - name: TENSOR_WASM_ETCD_CA
          value: /etc/tensor-wasm/etcd-ca/ca.crt
        {{- end }}
        {{- with .Values.proxy.auditLog }}
        - name: TENSOR_WASM_API_AUDIT_LOG
          value: {{ . | quote }}
        {{- end }}
        {{- if gt $replicas 1 }}
        # proxy.rateLimit is the tenant's quota across the fleet; each of
        # the {{ $replicas }} proxies counts its own share.
        {{- end }}
        - name: TENSOR_WASM_API_RATE_LIMIT_QPS
          value: {{ include "tensor-wasm.perProxyQps" (dict "qps" .Values.proxy.rateLimit.qps "replicas" $replicas) | quote }}
        - name: TENSOR_WASM_API_RATE_LIMIT_BURST
          value: {{ include "tensor-wasm.perProxyBurst" (dict "burst" .Values.proxy.rateLimit.burst "replicas" $replicas) | quote }}
        {{- with .Values.proxy.rateLimit.overrides }}
        {{- $overrides := list }}
        {{- range $tenant, $q := . }}
        {{- $share := include "tensor-wasm.perProxyQps" (dict "qps" $q.qps "replicas" $replicas) }}
        {{- if hasKey $q "burst" }}
        {{- $share = printf "%s:%s" $share (include "tensor-wasm.perProxyBurst" (dict "burst" $q.burst "replicas" $replicas)) }}
        {{- end }}
        {{- $overrides = append $overrides (printf "%s=%s" $tenant $share) }}
        {{- end }}
        - name: TENSOR_WASM_API_RATE_LIMIT_OVERRIDES
          value: {{ join "," $overrides | quote }}
        {{- end }}
        - name: TENSOR_WASM_MIGRATION_QUEUE_DEADLINE_MS
          value: {{ .Values.proxy.queueDeadlineMs | quote }}
        - name: TENSOR_WASM_PROXY_THREADS
          value: {{ .Values.proxy.threads | quote }}
        - name: RUST_LOG
          value: {{ .Values.proxy.logLevel | quote }}
      ports:
        - name: http
          containerPort: 8080
        - name: admin
          containerPort: 9090
      {{- if $placement }}
      # Out of the Service's endpoints before it stops accepting
      # connections: a stopping proxy keeps serving while the removal
      # spreads to every node, so a rolling update refuses no connection.
      lifecycle:
        preStop:
          exec:
            command: ["sleep", "5"]
      {{- end }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 10
        timeoutSeconds: 2
        failureThreshold: 3
      readinessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: 5
        timeoutSeconds: 2
      resources:
        {{- toYaml .Values.proxy.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: state
          mountPath: /var/lib/tensor-wasm/proxy
        - name: secrets
          mountPath: /etc/tensor-wasm/secrets
          readOnly: true
        {{- if and $placement $.Values.etcd.tls.caSecret }}
        - name: etcd-ca
          mountPath: /etc/tensor-wasm/etcd-ca
          readOnly: true
        {{- end }}
        - name: tmp
          mountPath: /tmp
  volumes:
    {{- if not (and $placement .Values.proxy.persistence.enabled) }}
    - name: state
      {{- if .Values.proxy.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ $fullname }}-proxy-state
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    - name: secrets
      secret:
        secretName: {{ $secret }}
        defaultMode: 0400
        items:
          - key: api-tokens
            path: api-tokens
    {{- if and $placement $.Values.etcd.tls.caSecret }}
    - name: etcd-ca
      secret:
        secretName: {{ $.Values.etcd.tls.caSecret }}
        defaultMode: 0444
        items:
          - key: {{ $.Values.etcd.tls.caKey }}
            path: ca.crt
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
  {{- with .Values.proxy.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.proxy.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.proxy.affinity }}
  affinity:
    {{- toYaml .Values.proxy.affinity | nindent 4 }}
  {{- else if $placement }}
  # Proxies on different nodes where there are enough: one node going
  # takes one proxy with it.
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "tensor-wasm.selector" . | nindent 16 }}
                app.kubernetes.io/component: proxy
  {{- end }}
{{- end -}}
