# The Kubernetes example deploy/kubernetes/gateway.yaml, without a cluster: its YAML parses (python3-yaml); the
# objects refer to each other consistently (ServiceAccount, Role, RoleBinding, ConfigMap keys and mounts, probe and
# Service ports, selectors); the Role grants exactly get + patch on deployments/scale of the actuator's Deployment;
# and the embedded nginx.conf and autoscale.lua run under the test nginx, with the environment Kubernetes would give
# the pod pointing at loopback stand-ins: a backend (the Service `api`), Redis, and tools/fake_k8s_api.py serving the
# scale subresource over TLS with a service-account token and CA made here. The gateway must serve, answer status,
# metrics and scaling, and scale `api` to its `min` with only the calls the Role allows.
use strict;
use warnings;
use lib 't/lib';
use Test::More;
use JSON::PP ();
use POSIX ();
use Time::HiRes ();
use ScratchNginx qw(scratch_dir temp_paths start_nginx stop_nginx http_get backends_conf repo_root);

my $repo = repo_root();
my $yaml_file = "$repo/deploy/kubernetes/gateway.yaml";
my $base = $ENV{TEST_NGINX_SERVER_PORT} || 1984;
my ($gw_port, $status_port, $backend_port, $pod_port, $redis_port, $api_port, $dns_port) = map { $base + $_ } 10 .. 16;

# --- the YAML, parsed by python3-yaml (every document, as JSON)
my $json = `python3 -c 'import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))' '$yaml_file' 2>&1`;
is($? >> 8, 0, 'the YAML parses with python3-yaml') or BAIL_OUT($json);
my @docs = grep { defined } @{ JSON::PP::decode_json($json) };
my %obj;
for my $d (@docs) {
    ok(!exists $obj{"$d->{kind}/$d->{metadata}{name}"}, "$d->{kind}/$d->{metadata}{name} once");
    $obj{"$d->{kind}/$d->{metadata}{name}"} = $d;
    is($d->{metadata}{namespace}, 'default', "$d->{kind}/$d->{metadata}{name} is in the namespace default");
}
my %kinds = map { $_->{kind} => 1 } @docs;
is_deeply([sort keys %kinds], [qw(ConfigMap Deployment Role RoleBinding Service ServiceAccount)], 'the kinds');

my ($deploy) = grep { $_->{kind} eq 'Deployment' } @docs;
my ($cm) = grep { $_->{kind} eq 'ConfigMap' } @docs;
my ($sa) = grep { $_->{kind} eq 'ServiceAccount' } @docs;
my ($role) = grep { $_->{kind} eq 'Role' } @docs;
my ($binding) = grep { $_->{kind} eq 'RoleBinding' } @docs;
my $pod = $deploy->{spec}{template}{spec};
my ($c) = @{ $pod->{containers} };

is($pod->{serviceAccountName}, $sa->{metadata}{name}, 'the pods run as the ServiceAccount');
is_deeply($binding->{subjects}, [{ kind => 'ServiceAccount', name => $sa->{metadata}{name}, namespace => 'default' }],
    'the RoleBinding binds the ServiceAccount');
is_deeply($binding->{roleRef}, { apiGroup => 'rbac.authorization.k8s.io', kind => 'Role', name => $role->{metadata}{name} },
    'the RoleBinding grants the Role');
is_deeply($deploy->{spec}{selector}{matchLabels}, $deploy->{spec}{template}{metadata}{labels},
    'the Deployment selects its pods');
is_deeply($obj{'Service/resty-autoscale'}{spec}{selector}, $deploy->{spec}{template}{metadata}{labels},
    'the Service selects the gateway pods');
my %port_names = map { $_->{name} => $_->{containerPort} } @{ $c->{ports} };
is($port_names{$obj{'Service/resty-autoscale'}{spec}{ports}[0]{targetPort}}, 8080, 'the Service targets port 8080');
is($port_names{$c->{$_}{httpGet}{port}}, 9145, "the $_ uses port 9145") for qw(readinessProbe livenessProbe);
is($c->{$_}{httpGet}{path}, '/autoscale/status', "the $_ asks the status") for qw(readinessProbe livenessProbe);
my ($vol) = @{ $pod->{volumes} };
is($vol->{configMap}{name}, $cm->{metadata}{name}, 'the volume is the ConfigMap');
my %mounts = map { $_->{subPath} => $_->{mountPath} } @{ $c->{volumeMounts} };
is_deeply([sort keys %mounts], [sort keys %{ $cm->{data} }], 'every ConfigMap key is mounted');
is($mounts{'nginx.conf'}, '/usr/local/openresty/nginx/conf/nginx.conf', "nginx.conf replaces the image's");

my $conf = $cm->{data}{'nginx.conf'};
my $lua = $cm->{data}{'autoscale.lua'};
like($conf, qr{dofile\("\Q$mounts{'autoscale.lua'}\E"\)}, 'nginx.conf reads autoscale.lua where it is mounted');

# What the actuator is configured to scale, and what the Role allows.
my ($ns, $kind, $name) = $lua =~ /namespace = "([^"]+)", kind = "([^"]+)", name = "([^"]+)"/;
ok($name, 'the actuator names its Deployment');
is_deeply($role->{rules}, [{ apiGroups => ['apps'], resources => ["${kind}s/scale"], resourceNames => [$name],
                             verbs => ['get', 'patch'] }],
    "the Role grants get and patch on ${kind}s/scale of $name, and nothing else");
is($ns, $role->{metadata}{namespace}, 'the actuator scales in the Role\'s namespace');

# --- the embedded configuration under the test nginx
my $dir = scratch_dir('k8s');
mkdir "$dir/sa";
chmod 0755, "$dir/sa";
open my $ext, '>', "$dir/san.ext" or die;
print $ext "subjectAltName=DNS:kubernetes.default.svc\n";
close $ext;
for my $cmd (
    "openssl req -x509 -newkey rsa:2048 -nodes -keyout $dir/ca.key -out $dir/sa/ca.crt -days 1 -subj /CN=test-ca",
    "openssl req -newkey rsa:2048 -nodes -keyout $dir/srv.key -out $dir/srv.csr -subj /CN=kubernetes",
    "openssl x509 -req -in $dir/srv.csr -CA $dir/sa/ca.crt -CAkey $dir/ca.key -CAcreateserial -out $dir/srv.crt -days 1 -extfile $dir/san.ext",
) {
    system("$cmd >/dev/null 2>&1") == 0 or BAIL_OUT("failed: $cmd");
}
my $token = 'sa-token-' . int(rand(1e9));
open my $tok, '>', "$dir/sa/token" or die;
print $tok "$token\n";
close $tok;
chmod 0644, map { "$dir/$_" } qw(sa/ca.crt sa/token srv.crt srv.key);

my %n;
$n{sa}        = $conf =~ s{/var/run/secrets/kubernetes\.io/serviceaccount/}{$dir/sa/}g;
$n{sa_lua}    = $lua  =~ s{/var/run/secrets/kubernetes\.io/serviceaccount/}{$dir/sa/}g;
$n{dofile}    = $conf =~ s{\Q$mounts{'autoscale.lua'}\E}{$dir/autoscale.lua}g;
$n{lua_path}  = $conf =~ s{(lua_package_path\s+")/usr/local/openresty/site/lualib/\?\.lua}{$1$repo/lua/?.lua}g;
$n{lua_cpath} = $conf =~ s{(lua_package_cpath\s+")/usr/local/openresty/site/lualib/}{$1$repo/target/release/lib}g;
$n{gateway}   = $conf =~ s{\blisten 8080;}{listen 127.0.0.1:$gw_port;}g;
$n{status}    = $conf =~ s{\blisten 9145;}{listen 127.0.0.1:$status_port;}g;
$n{error_log} = $conf =~ s{^error_log /dev/stderr}{error_log $dir/logs/error.log}m;
$n{access}    = $conf =~ s{access_log /dev/stdout;}{access_log $dir/logs/access.log;}g;
$n{workers}   = $conf =~ s{^worker_processes auto;}{worker_processes 2;}m;
$n{http}      = $conf =~ s#^http \{\n#"http {\n" . temp_paths($dir)#me;
# DNS discovery asks a dnsmasq on loopback standing in for the cluster DNS.
$n{dns}       = $lua =~ s#type = "SRV" \}#type = "SRV", nameservers = { "127.0.0.1:$dns_port" } }#g;
is_deeply([grep { !$n{$_} } sort keys %n], [], 'the embedded configuration takes every adjustment');
$conf = join('', map { "load_module $_;\n" } @ScratchNginx::MODULES) . "pid $dir/logs/nginx.pid;\n$conf";
open my $lf, '>', "$dir/autoscale.lua" or die;
print $lf $lua;
close $lf;
chmod 0644, "$dir/autoscale.lua";

# The stand-ins: each started in the background, stopped by its PID at the end.
mkdir "$dir/logs";
chmod 0755, "$dir/logs";
my @children;
sub spawn {
    my ($log, @cmd) = @_;
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        POSIX::setsid();
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', $log;
        open STDERR, '>&', \*STDOUT;
        { no warnings 'exec'; exec @cmd; }
        POSIX::_exit(127);
    }
    push @children, $pid;
    return $pid;
}
sub listening {
    my ($port) = @_;
    for (1 .. 100) {
        return 1 if IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 1);
        Time::HiRes::sleep(0.05);
    }
    return 0;
}
require IO::Socket::INET;
my $backends_dir = scratch_dir('k8s-backend');
my ($backends, $berr) = start_nginx($backends_dir, backends_conf($backends_dir, $backend_port, $pod_port));
ok($backends, 'the backends (the Service api, and a pod of api) start') or diag($berr);
# the cluster DNS: the SRV record of the headless Service names the pod
my $srv = '_http._tcp.api-headless.default.svc.cluster.local';
my $dnsmasq = -x '/usr/sbin/dnsmasq' ? '/usr/sbin/dnsmasq' : 'dnsmasq';
spawn("$dir/logs/dnsmasq.log", 'timeout', '120', $dnsmasq, '--keep-in-foreground', "--port=$dns_port",
      '--listen-address=127.0.0.1', '--bind-interfaces', '--no-resolv', '--no-hosts', '--user=root', '--pid-file=',
      '--local-ttl=1', '--host-record=pod-1.api-headless.default.svc.cluster.local,127.0.0.1',
      "--srv-host=$srv,pod-1.api-headless.default.svc.cluster.local,$pod_port,0,1");
spawn("$dir/logs/redis.log", 'timeout', '120', 'redis-server', '--port', $redis_port, '--bind', '127.0.0.1',
      '--save', '', '--appendonly', 'no');
spawn("$dir/logs/k8s.log", 'timeout', '120', 'python3', "$repo/tools/fake_k8s_api.py", '--port', $api_port,
      '--cert', "$dir/srv.crt", '--key', "$dir/srv.key", '--token', $token, '--object', "${kind}s/$ns/$name=1");
ok(listening($redis_port), 'Redis listens');
ok(listening($api_port), 'the fake API server listens');

my %env = (API_SERVICE_HOST => '127.0.0.1', API_SERVICE_PORT => $backend_port,
           KUBERNETES_SERVICE_HOST => '127.0.0.1', KUBERNETES_SERVICE_PORT => $api_port,
           REDIS_SERVICE_HOST => '127.0.0.1', REDIS_SERVICE_PORT => $redis_port);
my ($pid, $err) = start_nginx($dir, $conf, \%env);
ok($pid, 'nginx starts with the embedded nginx.conf and autoscale.lua') or diag($err);
if ($pid) {
    my $r = http_get("http://127.0.0.1:$gw_port/");
    is($r->{status}, 200, 'the gateway answers 200');
    # DNS discovery replaces the seed (the Service's ClusterIP) by the pod its SRV record names
    my $served;
    for (1 .. 100) {
        $r = http_get("http://127.0.0.1:$gw_port/");
        last if ($served = $r->{status} == 200 && $r->{content} =~ /^backend $pod_port$/m);
        Time::HiRes::sleep(0.1);
    }
    ok($served, 'the pod that DNS discovery found serves the gateway\'s requests');
    my $st = http_get("http://127.0.0.1:$status_port/autoscale/status");
    is($st->{status}, 200, 'the probes\' status answers 200');
    like($st->{content}, qr{"api"}, 'the status names the upstream');
    is(http_get("http://127.0.0.1:$status_port/metrics")->{status}, 200, 'metrics answer 200');
    is(http_get("http://127.0.0.1:$status_port/autoscale/scaling")->{status}, 200, 'the scaling handler answers 200');

    # min = 2 with one peer serving: the leader scales the Deployment to 2 through the scale subresource
    my $replicas;
    for (1 .. 100) {
        my $objects = `curl -sk https://127.0.0.1:$api_port/__test/objects`;
        $replicas = $1 if $objects =~ /"\Q${kind}s\/$ns\/$name\E"\s*:\s*(\d+)/;
        last if defined $replicas && $replicas == 2;
        Time::HiRes::sleep(0.1);
    }
    is($replicas, 2, "the gateway scaled ${kind}s/$name to its min through the API");
    my $requests = JSON::PP::decode_json(`curl -sk https://127.0.0.1:$api_port/__test/requests` || '[]');
    my %verb = (GET => 'get', PATCH => 'patch');
    my %calls = map { ($verb{$_->{method}} // $_->{method}) . ' ' . $_->{path} => 1 } @$requests;
    is_deeply([sort keys %calls], ["get /apis/apps/v1/namespaces/$ns/${kind}s/$name/scale",
                                   "patch /apis/apps/v1/namespaces/$ns/${kind}s/$name/scale"],
        'the actuator made only the calls the Role allows') or diag(explain($requests));
    ok(stop_nginx($pid), "nginx stopped (pid $pid)");
    my @bad = grep { /\[(?:error|crit|alert|emerg)\]/ } split /\n/, ScratchNginx::slurp("$dir/logs/error.log");
    is_deeply(\@bad, [], 'no error in the error log');
}
stop_nginx($backends) if $backends;
for my $child (@children) {
    kill 'TERM', -$child;
    waitpid $child, 0;
}
done_testing();
