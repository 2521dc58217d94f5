// Prints the broker's own request and byte counters, read over JMX from a running Kafka
// (attach by pid: no JMX port to open). Run with a JDK: java BrokerMetrics.java <pid>
// Output, one per line: request<TAB>name<TAB>count, bytes_in|bytes_out<TAB>topic<TAB>count.
import com.sun.tools.attach.VirtualMachine;
import javax.management.MBeanServerConnection;
import javax.management.ObjectName;
import javax.management.remote.JMXConnector;
import javax.management.remote.JMXConnectorFactory;
import javax.management.remote.JMXServiceURL;

public class BrokerMetrics {
    public static void main(String[] args) throws Exception {
        VirtualMachine vm = VirtualMachine.attach(args[0]);
        String address = vm.startLocalManagementAgent();
        vm.detach();
        try (JMXConnector connector = JMXConnectorFactory.connect(new JMXServiceURL(address))) {
            MBeanServerConnection server = connector.getMBeanServerConnection();
            ObjectName requests =
                new ObjectName("kafka.network:type=RequestMetrics,name=RequestsPerSec,*");
            for (ObjectName name : server.queryNames(requests, null)) {
                System.out.println("request\t" + name.getKeyProperty("request") + "\t"
                    + server.getAttribute(name, "Count"));
            }
            for (String kind : new String[] {"BytesInPerSec", "BytesOutPerSec"}) {
                ObjectName bytes =
                    new ObjectName("kafka.server:type=BrokerTopicMetrics,name=" + kind + ",*");
                for (ObjectName name : server.queryNames(bytes, null)) {
                    String topic = name.getKeyProperty("topic");
                    if (topic == null) continue;
                    System.out.println((kind.startsWith("BytesIn") ? "bytes_in" : "bytes_out")
                        + "\t" + topic + "\t" + server.getAttribute(name, "Count"));
                }
            }
        }
    }
}
